"""``python -m bench.gateway`` runs: kiln's app under uvicorn, a real worker process on the
fake engine, a client in another process; every token of both dialects is counted."""

import subprocess
import sys

from tests.conftest import require_model


def test_bench_gateway_counts_every_token():
    require_model()  # the app registers the bundled model's name (its GGUF is not loaded)
    out = subprocess.run([sys.executable, "-m", "bench.gateway", "--streams", "2", "--delay", "0.002"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:] for line in out.stdout.splitlines()
            if line.startswith("| o")}
    assert set(rows) == {"openai", "ollama"}, out.stdout
    for dialect, cells in rows.items():
        tokens, cpu_ms = int(cells[0]), float(cells[1])
        assert tokens == 2 * 64, (dialect, out.stdout)  # the fake engine's 64-word reply, twice
        assert 0 < cpu_ms < 50, (dialect, out.stdout)
