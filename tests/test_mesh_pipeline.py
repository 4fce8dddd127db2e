"""The whole speech pipeline under device meshes equals transformers.

A small random transformers checkpoint is saved, converted with the real converter (fp32) and run by
`OmniPipeline.load(ckpt, mesh=...)` in one subprocess per mesh, each with 32 simulated CPU devices
(tests/mesh_pipeline_worker.py): tp4ep8 (32 devices, the production mesh) and ep8 (8: expert parallel without
tensor parallelism; tp2ep2 runs the thinker in tests/test_sharding.py). The fixture has 8 thinker / 8
talker experts and 2 KV heads in both LMs, so tp4 also exercises the replicated-KV-head fallback. Each
mesh is compared with transformers' own greedy `generate(..., return_audio=True)` per prompt (the
single-device path meets the same oracle in tests/test_pipeline.py): greedy text tokens and all 16 code
groups identical; the waveform and the thinker's prefill logits may differ only by fp32 summation order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from omni_jax.checkpoint.convert import convert_checkpoint
from tests import reference, procs
from tests.test_pipeline import SPECIAL, THINKER_EXTRA, _chat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ("tp4ep8", "ep8")
SEED = 21
ROWS = [(3, 5), (0, 2)]  # (system_len, user_len): two prompts of different lengths
SPEAKERS = ["ethan", "Chelsie"]
THINKER_NEW, TALKER_NEW, MAX_LEN = 6, 8, 64


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


@pytest.fixture(scope="module")
def mesh_reference(tmp_path_factory):
    """The converted checkpoint, a work dir, transformers' greedy outputs per prompt, the job and the HF model."""
    cfg = reference.hf_config_dict(reference.tiny_config_dict())
    cfg.update(SPECIAL)
    cfg["thinker_config"].update(THINKER_EXTRA)
    cfg["talker_config"].update(reference.TALKER_EXTRA)
    hf = reference.build_hf_model(cfg, seed=SEED)
    hf_dir = reference.save_hf_model(hf, str(tmp_path_factory.mktemp("mesh_pipe_hf")))
    work = tmp_path_factory.mktemp("mesh_pipe")
    ckpt = str(work / "ckpt")
    convert_checkpoint(hf_dir, ckpt, dtype="float32", progress=False)
    rng = np.random.default_rng(SEED)
    job = {"prompts": [_chat(rng, *r) for r in ROWS], "speakers": SPEAKERS, "thinker_new": THINKER_NEW,
           "talker_new": TALKER_NEW, "max_len": MAX_LEN, "eos_ids": [SPECIAL["im_end_token_id"]]}
    want = {}
    for r, (prompt, speaker) in enumerate(zip(job["prompts"], SPEAKERS)):
        tokens, want[f"codes_{r}"], want[f"wav_{r}"] = reference.hf_generate(
            hf, prompt, speaker, THINKER_NEW, TALKER_NEW, SPECIAL["im_end_token_id"])
        want.setdefault("tokens", []).append(tokens)
        with torch.no_grad():
            want[f"logits_{r}"] = hf.thinker(input_ids=torch.tensor([prompt])).logits[0].numpy()
    return ckpt, work, want, job, hf


def _run_mesh(ckpt: str, work, job: dict, spec: str, tag: str = ""):
    """One worker process (32 simulated devices) per mesh, so each test stays short: (report, arrays)."""
    out = work / f"out_{spec}{tag}"
    out.mkdir()
    job_path = work / f"job_{spec}{tag}.json"
    job_path.write_text(json.dumps(dict(job, meshes=[spec])))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tests.mesh_pipeline_worker", ckpt, str(job_path), str(out)],
                          cwd=ROOT, env=procs.env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    print(proc.stdout, f"worker {time.perf_counter() - t0:.1f}s")
    report = json.loads((out / "report.json").read_text())
    return report, dict(np.load(out / f"{spec}.npz"))


@pytest.mark.heavy
@pytest.mark.parametrize("spec", MESHES)
def test_pipeline_under_mesh_matches_transformers(mesh_reference, spec):
    ckpt, work, want, job, _ = mesh_reference
    report, got = _run_mesh(ckpt, work, job, spec)
    assert report["devices"] == 32
    run = report["runs"][spec]
    assert run["mesh_devices"] == {"tp4ep8": 32, "ep8": 8, "tp2ep2": 4}[spec]
    rows = range(len(job["prompts"]))
    logit_err = max(_rel(got["logits"][r, : len(job["prompts"][r])], want[f"logits_{r}"]) for r in rows)
    wav_errs = [(float(np.max(np.abs(got[f"wav_{r}"] - want[f"wav_{r}"]))), _rel_l2(got[f"wav_{r}"], want[f"wav_{r}"]))
                for r in rows]
    print(f"{spec}: prefill logits rel {logit_err:.2e}; wav (max abs, rel L2) per row {wav_errs}")
    assert logit_err <= 1e-4  # fp32: only the summation order of sharded matmuls / psums differs
    assert run["tokens"] == want["tokens"]  # greedy text identical
    for r in rows:
        assert len(want["tokens"][r]) >= 2  # long enough to voice, so codes/wav below are non-trivial
        codes, ref_codes = got[f"codes_{r}"], want[f"codes_{r}"]
        assert ref_codes.shape == (16, TALKER_NEW - 1)  # no codec EOS in the budget
        np.testing.assert_array_equal(codes, ref_codes)  # all 16 code groups of every frame, greedy
        assert got[f"wav_{r}"].shape == want[f"wav_{r}"].shape and want[f"wav_{r}"].size > 0
        max_abs, rel_l2 = wav_errs[r]
        assert max_abs <= 1e-5 and rel_l2 <= 1e-4  # same codes in, fp32 vocoders; summation order only


@pytest.mark.heavy
def test_spoken_and_visual_questions_under_tp4ep8_match_transformers(mesh_reference):
    """Audio, images and video in under the production mesh (expert-parallel thinker and talker; the encoders
    replicated): a spoken question and a question about two images and a video, in one batch, each equal to
    transformers' generate with input_features / pixel_values (deepstack and 3-D positions included)."""
    from tests.test_pipeline import _audio_prompt, _clip, _hf_visual, _tiny_visuals, _vision_prompt, hf_audio_inputs
    from omni_jax.models.audio_encoder import rows_for_frames
    from omni_jax.processing import audio as audio_lib

    ckpt, work, _, job, hf = mesh_reference
    rng = np.random.default_rng(7)
    feats = audio_lib.log_mel(_clip(rng, 130), 16)
    images, [video] = _tiny_visuals(rng)
    visual = images + [video]
    pad = {"image": THINKER_EXTRA["image_token_id"], "video": THINKER_EXTRA["video_token_id"]}
    prompts = [_audio_prompt(rng, [rows_for_frames(130, 100)]),
               _vision_prompt(rng, [[pad[v.kind]] * v.tokens(2) for v in visual])]
    np.savez(work / "media.npz", feat_0_0=feats, **{f"vis_1_{i}": v.patches for i, v in enumerate(visual)})
    media_job = dict(job, prompts=prompts, media=str(work / "media.npz"), audio_counts=[1, 0],
                     visual=[[], [[v.kind, list(v.grid), v.seconds_per_grid] for v in visual]])
    report, got = _run_mesh(ckpt, work, media_job, "tp4ep8", tag="_media")
    run = report["runs"]["tp4ep8"]
    extras = [hf_audio_inputs([feats]), _hf_visual(visual)]
    for r, (prompt, speaker) in enumerate(zip(prompts, SPEAKERS)):
        tokens, codes, wav = reference.hf_generate(hf, prompt, speaker, THINKER_NEW, TALKER_NEW,
                                                   SPECIAL["im_end_token_id"], **extras[r])
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logits = hf.thinker(input_ids=ids, attention_mask=torch.ones_like(ids), **extras[r]).logits[0, -1].numpy()
        print(f"row {r}: logits rel L2 {_rel_l2(got['logits'][r], logits):.2e}, wav rel L2 "
              f"{_rel_l2(got[f'wav_{r}'], wav):.2e}")
        assert _rel_l2(got["logits"][r], logits) <= 1e-5
        assert run["tokens"][r] == tokens
        np.testing.assert_array_equal(got[f"codes_{r}"], codes)
        assert got[f"wav_{r}"].shape == wav.shape and _rel_l2(got[f"wav_{r}"], wav) <= 1e-4
