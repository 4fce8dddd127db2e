"""notebooks/quickstart.ipynb runs top to bottom in a fresh kernel of this interpreter, from the repo root."""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")
KERNEL = "omni-jax-test"


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}"
    return cells[0]


@pytest.mark.heavy
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    # A private kernelspec whose argv is this interpreter: the stock 'python3' spec runs whatever `python`
    # is first on PATH, which in CI need not be the venv under test.
    prefix = tmp_path / "jupyter"
    kernelspec.install(kernel_name=KERNEL, prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    # The kernel inherits the session's environment (tests/conftest.py): CPU, the shared compile cache.
    monkeypatch.delenv("MPLBACKEND", raising=False)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=600, allow_errors=False,
                                     resources={"metadata": {"path": REPO}})
    client.execute()  # raises CellExecutionError naming the failing cell

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    install_out = "".join(o.get("text", "") for o in _tagged(nb, "install").outputs if o.output_type == "stream")
    assert "skipping the install" in install_out  # importable here: the Colab install branch must not run

    audio = [o for o in _tagged(nb, "audio").outputs if o.output_type in ("execute_result", "display_data")]
    assert audio and "<audio" in audio[0]["data"]["text/html"]
    plot = [o for o in _tagged(nb, "plot").outputs if o.output_type in ("execute_result", "display_data")]
    assert any("image/png" in o["data"] for o in plot)
    # speech in -> speech out: both clips are shown as players, and the prompt carried 1.5 s of audio tokens
    speech = _tagged(nb, "speech_in").outputs
    players = [o for o in speech if o.output_type == "display_data" and "<audio" in o["data"].get("text/html", "")]
    assert len(players) == 2
    printed = "".join(o.get("text", "") for o in speech if o.output_type == "stream")
    assert "audio tokens in the prompt: 20 " in printed  # 150 mel frames: 13 + ceil(50 / 8)
