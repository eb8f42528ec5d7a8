"""Numba's typed-dict functions through the on-disk cache (orchestrator.data.compile_cache): `import ffcv`
fills a typed Dict, and a process after the first must load those functions from the cache instead of
compiling them again, with the same dict. Each reading runs in a fresh process (nothing compiled yet)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

IMPORT_FFCV = """
import json, sys
sys.path.insert(0, {repo!r})
from orchestrator.data.compile_cache import enable_compile_cache
enable_compile_cache({cache_dir!r})
from ffcv.fields.rgb_image import IMAGE_MODES
from numba.typed import typeddict
print(json.dumps({{"modes": dict(IMAGE_MODES),
                   "hits": sum(typeddict._setitem.stats.cache_hits.values()),
                   "misses": sum(typeddict._setitem.stats.cache_misses.values())}}))
"""


def import_ffcv(cache_dir: Path) -> dict:
    code = IMPORT_FFCV.format(repo=str(REPO), cache_dir=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_later_process_loads_the_typed_dict_functions_ffcv_uses_from_the_cache(tmp_path):
    cache = tmp_path / "numba-cache"
    first, second = import_ffcv(cache), import_ffcv(cache)
    assert first["misses"] > 0 and first["hits"] == 0  # compiled, and written to the cache
    assert any(cache.rglob("typeddict*.nbi"))
    assert second["hits"] > 0 and second["misses"] == 0  # loaded, not compiled again
    assert first["modes"] == second["modes"] == {"jpg": 0, "raw": 1}
