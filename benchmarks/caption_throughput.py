"""Caption stage throughput, from one run: LLM captions/s through the Ray Data stage vs vLLM's own
`LLM.generate` (via `LLM.chat`) on the same prompts, and CLAP clips/s in the stage vs bare
batched CLAP inference.

    python benchmarks/caption_throughput.py --clips 32 --candidates 2 --max-tokens 32 [--clap PATH]

Two LLM ratios: steady state (start-up excluded on both sides: the stage's rate is taken between
its first and last finished batch, which overstates it when batches run concurrently in the
engine; `LLM.chat` is timed after the engine is built), and wall time with engine start on both
sides, which dominates at small N. Without --clap a tiny random transformers CLAP
is built (no CLAP weights exist offline): its clips/s measures the plumbing, not HTSAT.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("caption_throughput")

CAPTIONS = ["piano", "rock guitar drums", "ambient pad", "jazz trio", "", "edm drop", "folk song with banjo", "orchestral"]


def _rows(n: int):
    from schemas import tables as T

    return [
        {T.CLIP_ID: f"clip{i:04d}", T.STATUS: T.OK, T.CAPTION_ORIGINAL: CAPTIONS[i % len(CAPTIONS)], T.TAGS: ["tag"], T.METADATA_JSON: "{}"}
        for i in range(n)
    ]


def _stamp(row: dict) -> dict:
    return {**row, "t_done": time.time()}


def bench_llm(cfg, n_clips: int) -> dict:
    import ray

    from pipeline import llm as L

    model = L.resolve_model(cfg)
    rows = _rows(n_clips)
    prompts = [r for row in rows for r in L.expand_prompts(row, cfg)]

    # 1. the Ray Data stage (engine inside a Ray actor)
    t0 = time.perf_counter()
    light = {"num_cpus": cfg.aux_num_cpus}
    ds = ray.data.from_items(rows).flat_map(L.expand_prompts, fn_kwargs={"cfg": cfg}, **light)
    out = L.build_processor(cfg, model)(ds).map(_stamp, **light).to_pandas()
    stage_wall = time.perf_counter() - t0
    done = sorted(out["t_done"])
    first_batch = min(cfg.batch_size, len(done)) - 1
    span = done[-1] - done[first_batch]
    stage_rate = (len(done) - first_batch - 1) / span if span > 0 else float("nan")

    # 2. vLLM's own API on the same prompts and sampling params (same process, no Ray)
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, **L.engine_kwargs(cfg))
    start = time.perf_counter() - t0
    messages = [json.loads(p["messages_json"]) for p in prompts]
    params = [SamplingParams(**L.sampling_params(cfg, p["clip_id"], p[L.K_COL])) for p in prompts]
    t0 = time.perf_counter()
    res = llm.chat(messages, params, use_tqdm=False)
    direct = time.perf_counter() - t0
    del llm
    return {
        "prompts": len(prompts),
        "stage_captions_per_s": stage_rate,
        "stage_wall_s_with_startup": stage_wall,
        "vllm_captions_per_s": len(res) / direct,
        "vllm_engine_start_s": start,
        "ratio": stage_rate / (len(res) / direct),
        "stage_wall_rate": len(done) / stage_wall,
        "vllm_wall_rate": len(res) / (start + direct),
        "wall_ratio": (len(done) / stage_wall) / (len(res) / (start + direct)),
    }


def bench_clap(clap_path: str | None, n_clips: int, batch_size: int, work: Path) -> dict:
    import numpy as np

    from model.clap import load_clap
    from pipeline import caption as C
    from pipeline.audio import load_clip
    from pipeline.runner import Resources, list_parts, run_stage, write_parts

    sys.path.insert(0, str(ROOT / "tests" / "pipeline"))
    import _caption_fixtures as F  # synthetic audio and the tiny CLAP builder

    if clap_path is None:
        model, features, tok = F.tiny_hf_clap()
        clap_path = str(work / "tiny-clap")
        model.save_pretrained(clap_path)
        features.save_pretrained(clap_path)
        tok.save_pretrained(clap_path)
    backend = "hf" if Path(clap_path).is_dir() else "laion"
    wav = F.write_wav(work / "tone.wav", F.tone(10.24))
    specs = [{"clip_id": f"c{i:04d}", "audio_path": wav, "caption": "a tone"} for i in range(n_clips)]
    import pyarrow as pa

    from schemas import tables as T

    table = F.quality_rows(specs)
    cands = [["soft piano melody", "loud noisy static"]] * n_clips
    table = table.append_column(T.CANDIDATES, pa.array(cands, pa.list_(pa.string())))
    table = table.append_column(T.CANDIDATE_REJECTS, pa.array([[]] * n_clips, pa.list_(pa.string())))
    write_parts(table, work / "cands", rows_per_part=max(1, n_clips // 2))
    ccfg = C.ClapConfig(backend=backend, path=clap_path, batch_size=batch_size)

    t0 = time.perf_counter()
    run_stage("caption-bench", work / "cands", work / "out", C.ClapSelectStage, {"clap": ccfg, "selection": C.SelectionConfig()}, Resources(batch_size=batch_size))
    stage = time.perf_counter() - t0
    assert len(list_parts(work / "out")) == len(list_parts(work / "cands"))

    clap = load_clap(backend, clap_path)
    waves = [load_clip(wav, 0.0, 10.24, 48_000) for _ in range(n_clips)]
    t0 = time.perf_counter()
    for i in range(0, n_clips, batch_size):
        a = clap.embed_audio(waves[i : i + batch_size], [s["clip_id"] for s in specs[i : i + batch_size]])
        texts = [t for j in range(len(a)) for t in ["a tone"] + cands[i + j]]
        np.asarray(clap.embed_text(texts))
    bare = time.perf_counter() - t0
    return {
        "clips": n_clips,
        "stage_clips_per_s": n_clips / stage,
        "bare_clips_per_s": n_clips / bare,
        "ratio": (n_clips / stage) / (n_clips / bare),
        "note": "stage time includes reading parts, decoding audio, actor start and model load",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--candidates", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clap", default=None, help="LAION .pt or transformers CLAP folder (default: tiny random)")
    p.add_argument("--clap-clips", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from pipeline import llm as L

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = L.LLMConfig(num_candidates=args.candidates, max_tokens=args.max_tokens, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        clap = bench_clap(args.clap, args.clap_clips, args.batch_size, Path(tmp))
        llm = bench_llm(cfg, args.clips)
    ray.shutdown()
    print(f"LLM  ({llm['prompts']} prompts, max_tokens={args.max_tokens}):")
    print(f"  Ray Data stage     {llm['stage_captions_per_s']:8.2f} captions/s (wall with engine start {llm['stage_wall_s_with_startup']:.1f}s)")
    print(f"  vLLM LLM.generate  {llm['vllm_captions_per_s']:8.2f} captions/s (engine start {llm['vllm_engine_start_s']:.1f}s)")
    print(f"  ratio stage/vLLM   {llm['ratio']:8.2f}  (steady state; the stage's span starts at its first finished batch, an optimistic bound)")
    print(f"  with engine start  {llm['stage_wall_rate']:8.2f} vs {llm['vllm_wall_rate']:.2f} captions/s, ratio {llm['wall_ratio']:.2f}")
    print(f"CLAP ({clap['clips']} clips):")
    print(f"  stage              {clap['stage_clips_per_s']:8.2f} clips/s ({clap['note']})")
    print(f"  bare batched       {clap['bare_clips_per_s']:8.2f} clips/s")
    print(f"  ratio stage/bare   {clap['ratio']:8.2f}")


if __name__ == "__main__":
    main()
