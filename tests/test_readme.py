"""The README's code snippet (teacher targets, semantic mask, student outputs) must run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_snippet_runs(capsys):
    blocks = re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)
    assert blocks, 'the README lost its python snippet'
    exec(compile(blocks[0], 'README.md', 'exec'), {})
    out = capsys.readouterr().out.split()
    assert out[:3] == ['torch.Size([2,', '104])', 'torch.Size([2,']       # printed shapes, as the README says
    assert 1.5 < float(out[-1]) < 2.5                                      # random init: 2 - 2 cos is about 2
