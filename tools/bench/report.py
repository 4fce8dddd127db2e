"""The human-readable table of a benchmark report."""

from __future__ import annotations


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    else:
        s = str(v)
    return s + unit


def table_rows(phases: dict) -> list[tuple]:
    """(phase row, ours, theirs, ratio, our roofline %, target = roofline figure) for the human table."""
    rows = []
    p = phases.get("prefill")
    if p:
        rows.append(("prefill tok/s", p["ours_tokens_per_s"], p["theirs_tokens_per_s"], p["ratio"],
                     p.get("ours_roofline_pct"), p.get("roofline_tokens_per_s")))
    d = phases.get("decode")
    if d:
        for key, r in d.items():
            if key.startswith("batch"):
                rows.append((f"decode b{r['batch']} tok/s", r["ours_tokens_per_s"], r["theirs_tokens_per_s"],
                             r["ratio"], r.get("ours_roofline_pct"), r.get("roofline_tokens_per_s")))
    t = phases.get("talker")
    if t:
        rows.append(("talker+cp frames/s", t.get("ours_frames_per_s"), t.get("theirs_frames_per_s"), t["ratio"],
                     t.get("ours_roofline_pct"), t.get("roofline_frames_per_s")))
    c = phases.get("code2wav")
    if c:
        rows.append(("code2wav RTF", c["ours_rtf"], c["theirs_rtf"], c["ratio"], c.get("ours_roofline_pct"),
                     c.get("roofline_rtf")))
    a = phases.get("audio_encoder")
    if a:
        rows.append((f"audio encoder {a['audio_seconds']:g} s (s)", a["ours_s"], a["theirs_s"], a["ratio"],
                     a.get("ours_roofline_pct"), a.get("roofline_s")))
    ve = phases.get("vision_encoder")
    if ve:
        for kind in ("image", "video"):
            r = ve.get(kind)
            if r:  # its patch grid (t, h, w) is in the JSON report
                rows.append((f"vision encoder {kind} (s)", r["ours_s"], r["theirs_s"], r["ratio"],
                             r.get("ours_roofline_pct"), r.get("roofline_s")))
    e = phases.get("e2e")
    if e:
        rows.append(("e2e first audio s", e["ours_time_to_first_audio_s"], e["theirs_time_to_first_audio_s"],
                     e["first_audio_ratio"], None, None))
        rows.append(("e2e total RTF", e["ours_rtf"], e["theirs_rtf"], e["ratio"], None, None))
    v = phases.get("vocoder_stream")
    if v:
        for n, r in v["chunks"].items():
            rows.append((f"vocoder {n}-frame chunk s", r["ours_s"], r.get("theirs_s"), r.get("ratio"), None, None))
    return rows


def _marks(breakdown: dict) -> str:
    """A stream's first-audio marks, in stage order, skipping the stages it did not have."""
    return ", ".join(f"{k.removesuffix('_s')} {_fmt(v)}" for k, v in breakdown.items() if v is not None)


def streaming_lines(phases: dict) -> list[str]:
    """Our streamed path against our own non-streaming one (transformers has no streaming to compare with)."""
    out = []
    e = phases.get("e2e")
    if e:
        out.append(f"stream total {_fmt(e['ours_stream']['s'])} s / generate {_fmt(e['ours_generate']['s'])} s = "
                   f"{_fmt(e['stream_over_generate'])}; first audio at: {_marks(e['ours_stream']['breakdown'])}")
        sp = e.get("ours_spoken_stream")
        if sp:
            out.append(f"spoken question ({sp['audio_in_s']:g} s of audio): first audio "
                       f"{_fmt(sp['time_to_first_audio_s'])} s; at: {_marks(sp['breakdown'])}")
        vq = e.get("ours_video_stream")
        if vq:
            out.append(f"video question ({vq['video_in_s']:g} s at 2 fps, {_fmt(vq['prompt_tokens'])} prompt tokens): "
                       f"first audio {_fmt(vq['time_to_first_audio_s'])} s (transformers' generate "
                       f"{_fmt(e.get('theirs_video_s'))} s, ratio {_fmt(e.get('video_first_audio_ratio'))}); at: "
                       f"{_marks(vq['breakdown'])}")
    v = phases.get("vocoder_stream")
    if v:
        lg = v["long"]
        out.append(f"vocoder long stream ({lg['chunks']} chunks of {lg['chunk_frames']}): chunk 5 "
                   f"{_fmt(lg['chunk5_s'])} s, chunk 200 {_fmt(lg['chunk200_s'])} s, ratio "
                   f"{_fmt(lg['chunk200_over_chunk5'])}; stream total / vocode {_fmt(lg['stream_over_vocode'])}")
    return out


def print_table(title: str, phases: dict) -> None:
    print(f"\n{title}")
    head = ("phase", "ours", "theirs", "ratio", "roofline %", "target")
    print(f"{head[0]:<22}{head[1]:>12}{head[2]:>12}{head[3]:>9}{head[4]:>12}{head[5]:>12}")
    for name, ours, theirs, ratio, pct, target in table_rows(phases):
        print(f"{name:<22}{_fmt(ours):>12}{_fmt(theirs):>12}{_fmt(ratio):>9}{_fmt(pct):>12}{_fmt(target):>12}")
    for line in streaming_lines(phases):
        print(line)
    compile_s = {k: v.get("compile_s") for k, v in phases.items() if isinstance(v, dict) and "compile_s" in v}
    for k, v in phases.get("decode", {}).items():
        if k.startswith("batch"):
            compile_s[f"decode {k}"] = v.get("compile_s")
    if compile_s:
        print("our compile s: " + ", ".join(f"{k} {_fmt(v)}" for k, v in compile_s.items()))
