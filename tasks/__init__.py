"""The paper's downstream tasks, each a flat script run from the repository root
(python -m tasks.NAME, or torchrun ... -m tasks.NAME) with its own module where it needs one:
action-recognition fine-tuning (finetune), AVA action localization (ava, finetune_ava) and
open-ended video QA (video_qa, finetune_qa)."""
