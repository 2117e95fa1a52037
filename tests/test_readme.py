"""The README must stay true: its code snippet (teacher targets, semantic mask, student outputs) runs as written, and
its reading-order table gives the files' current line counts."""
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


def test_reading_order_line_counts_are_current():
    """The reading-order table gives every file's length: the counts must be those of the files on disk."""
    rows = re.findall(r'^\| `([\w/]+\.py)` \| (\d+) \|', README.read_text(), flags=re.M)
    assert len(rows) >= 17, 'the README lost its reading-order table'
    stale = {name: (int(n), len((README.parent / name).read_text().splitlines())) for name, n in rows
             if int(n) != len((README.parent / name).read_text().splitlines())}
    assert not stale, f'README line counts (README, file): {stale}'
