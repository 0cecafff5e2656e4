"""Caption stage throughput, from one run: LLM candidates/s through the Ray Data stage vs vLLM's own
`LLM.generate` on the same prompts, and CLAP clips/s in the stage vs bare batched CLAP inference.

    python benchmarks/caption_throughput.py                      # LLM 512 clips x 2, CLAP 160 clips (~17 min on 2 CPUs)
    python benchmarks/caption_throughput.py --clips 100 --clap-clips 200   # N >= 200 on both halves
    python benchmarks/caption_throughput.py --clips 64 --clap-clips 16 --clap-size tiny   # quick look
    python benchmarks/caption_throughput.py --clap CLAP.pt --clap-text-model roberta/   # a real CLAP

LLM. Both halves get the same prompts (chat template applied as the stage decides: the model's
own or `chat_template`, its kwargs, a folded system prompt), the same per-candidate seeds and
sampling parameters, and the same engine profile and environment (`pipeline.llm`). vLLM's own
API runs first, in this process, with nothing else working: import, engine start, then
`LLM.generate` on every prompt at once. The Ray stage then runs as `mosaiq caption` runs it
(prompt rows -> chat-template actor -> vLLM engine actor -> postprocess). Two ratios:
- wall: prompts / seconds from nothing to the last caption, start-up included on both sides;
  at small N it is mostly engine start, which the stage pays inside a fresh Ray actor;
- steady: the stage from its first request entering the engine to its last caption out, vs
  `LLM.generate` alone. This is the one that matters for a long job.
It also counts how many captions are byte-identical between the halves (same seeds; vLLM on
CPU is not batch-invariant, so some differ). On a small CPU machine the stage pays for Ray's own
processes (driver, raylet, GCS) on the engine's cores, and Ray runs its workers, and so the
engine it spawns, at nice 15 below them.

CLAP. The stage is `pipeline.backend.run_parts` with `ClapSelectStage` (1 actor x --threads
CPUs: Ray gives it that many torch threads) over candidate tables in Parquet: it reads the parts,
starts the actor, loads the model, decodes and resamples every clip to 48 kHz, embeds audio and
texts, selects and writes. Bare is a plain loop in this process on the same number of torch
threads: decode a batch, embed it, score it (model load excluded), once before the stage and
once after (their spread shows the machine's drift; the ratio uses their mean). Also shown:
bare inference on clips decoded beforehand. Without --clap a randomly initialised CLAP of real size is built
(laion HTSAT-base audio + a RoBERTa-base-sized text tower, about 161M parameters): no CLAP
weights exist offline, and throughput does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # caption_kit: the tests' audio, tokenizer and CLAP builders

log = logging.getLogger("caption_throughput")

CAPTIONS = ["piano", "rock guitar drums", "ambient pad", "jazz trio", "", "edm drop", "folk song with banjo", "orchestral"]
TAGS = [["classical"], ["rock", "guitar"], ["ambient"], ["jazz", "double bass"], [], ["edm"], ["folk", "banjo"], ["film score"]]
CANDIDATE_TEXTS = ["soft piano melody with strings", "loud distorted guitar over fast drums", "calm ambient synth pad"]


# --- LLM -------------------------------------------------------------------------------------


def _clip_rows(n: int) -> list[dict]:
    from schemas import tables as T

    return [
        {
            T.CLIP_ID: f"clip{i:05d}",
            T.STATUS: T.OK,
            T.CAPTION_ORIGINAL: CAPTIONS[i % len(CAPTIONS)],
            T.TAGS: TAGS[i % len(TAGS)],
            T.METADATA_JSON: json.dumps({"bpm": 60 + i % 100}),
        }
        for i in range(n)
    ]


def bench_vllm_direct(cfg, model: str, prompts: list[dict]) -> dict:
    """vLLM's own API, in this process: import + engine start, then one `LLM.generate`."""
    from pipeline import llm as L

    os.environ.update(L.engine_env(cfg))  # what the stage's runtime_env gives its engine
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **L.engine_kwargs(cfg))
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tok = llm.get_tokenizer()
    setup = L.chat_setup(cfg, model)
    texts = [tok.apply_chat_template(L.engine_messages(p, setup), chat_template=setup.template, tokenize=False,
                                     add_generation_prompt=True, **setup.template_kwargs) for p in prompts]
    params = [SamplingParams(**L.sampling_params(cfg, p["clip_id"], p[L.K_COL])) for p in prompts]
    outputs = llm.generate(texts, params, use_tqdm=False)
    generate_s = time.perf_counter() - t0
    captions = {(p["clip_id"], p[L.K_COL]): o.outputs[0].text for p, o in zip(prompts, outputs)}
    llm.llm_engine.engine_core.shutdown()  # frees the CPU for the stage that runs next
    del llm
    gc.collect()
    return {"start_s": start_s, "generate_s": generate_s, "captions": captions}


def _timed_post(row: dict, default) -> dict:
    return {**default(row), "t_done": time.time(), "time_taken_llm": float(row.get("time_taken_llm") or -1.0)}


def bench_ray_stage(cfg, model: str, rows: list[dict]) -> dict:
    """The caption stage's LLM step on Ray Data, as `mosaiq caption` builds it."""
    import ray

    from pipeline import llm as L

    light = {"num_cpus": cfg.aux_num_cpus}
    t0, w0 = time.perf_counter(), time.time()
    ds = ray.data.from_items(rows).flat_map(L.expand_prompts, fn_kwargs={"cfg": cfg}, **light)
    out = L.build_processor(cfg, model, postprocess=_timed_post)(ds).to_pandas()
    wall_s = time.perf_counter() - t0
    answered = out[out["time_taken_llm"] >= 0]
    first_in = float((answered["t_done"] - answered["time_taken_llm"]).min())
    return {
        "wall_s": wall_s,
        "startup_s": first_in - w0,  # until the first request entered the engine
        "steady_s": float(out["t_done"].max()) - first_in,
        "errors": int((out[L.ERROR_COL] != "").sum()),
        "captions": {(r.clip_id, int(r.k)): r.llm_text for r in out.itertuples()},
    }


def bench_llm(cfg, n_clips: int) -> dict:
    from pipeline import llm as L

    model = L.resolve_model(cfg)
    rows = _clip_rows(n_clips)
    prompts = [p for row in rows for p in L.expand_prompts(row, cfg)]
    direct = bench_vllm_direct(cfg, model, prompts)
    stage = bench_ray_stage(cfg, model, rows)
    n = len(prompts)
    same = sum(1 for key, text in direct["captions"].items() if stage["captions"].get(key) == text)
    direct_wall = direct["start_s"] + direct["generate_s"]
    return {
        "prompts": n,
        "direct": direct,
        "stage": stage,
        "identical": same,
        "steady": (n / stage["steady_s"], n / direct["generate_s"]),
        "wall": (n / stage["wall_s"], n / direct_wall),
    }


# --- CLAP ------------------------------------------------------------------------------------


def _build_clap(size: str, work: Path) -> tuple[str, str, str]:
    """A random CLAP saved like a real one: (backend, path, text_model)."""
    import torch

    import caption_kit as F  # tokenizer and tiny CLAP builders shared with the tests

    torch.manual_seed(0)
    if size == "tiny":
        model, features, tok = F.tiny_hf_clap()
        folder = work / "tiny-clap"
        for part in (model, features, tok):
            part.save_pretrained(folder)
        return "hf", str(folder), ""
    from transformers import RobertaConfig

    from model.clap import build_laion_module, save_laion_checkpoint

    text = work / "roberta-base-sized"
    tok = F.byte_bpe_tokenizer()
    tok.save_pretrained(text)
    # RoBERTa-base's shape (12 layers, 768 wide, 514 positions); only the vocabulary is small
    RobertaConfig(vocab_size=len(tok), pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1).save_pretrained(text)
    module = build_laion_module(text, "HTSAT-base")
    save_laion_checkpoint(module, work / "clap-random.pt")
    return "laion", str(work / "clap-random.pt"), str(text)


def bench_clap(args, work: Path) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch

    import caption_kit as F
    from model.clap import load_clap
    from pipeline import caption as C
    from pipeline.audio import load_clip
    from pipeline import backend
    from pipeline.fs import list_parts, write_parts
    from pipeline.stage import Resources
    from schemas import tables as T
    from schemas.tables import CLAP_SAMPLE_RATE as SAMPLE_RATE

    if args.clap:
        kind = "hf" if Path(args.clap).is_dir() else "laion"
        path, text_model = args.clap, args.clap_text_model or ""
    else:
        kind, path, text_model = _build_clap(args.clap_size, work)
    n, bs = args.clap_clips, args.clap_batch_size
    # a few distinct 44.1 kHz files, so the stage decodes and resamples as it would on real data
    files = [F.write_wav(work / f"clip{i}.wav", (F.tone(10.24, 220.0 * (i + 1), seed=i) + 0.3 * F.noise(10.24, seed=i)) / 1.3, sr=44_100) for i in range(8)]
    specs = [{"clip_id": f"c{i:05d}", "audio_path": files[i % len(files)], "caption": CAPTIONS[i % len(CAPTIONS)] or "music"} for i in range(n)]
    cands = [CANDIDATE_TEXTS[: 1 + i % len(CANDIDATE_TEXTS)] for i in range(n)]
    table = F.quality_rows(specs)
    table = table.append_column(T.CANDIDATES, pa.array(cands, pa.list_(pa.string())))
    table = table.append_column(T.CANDIDATE_REJECTS, pa.array([[]] * n, pa.list_(pa.string())))
    write_parts(table, work / "cands", rows_per_part=args.clap_rows_per_part)
    resources = Resources(batch_size=bs, num_cpus=args.threads)
    ccfg = C.ClapConfig(backend=kind, path=path, text_model=text_model, resources=resources)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    clap = load_clap(kind, path, text_model)
    load_s = time.perf_counter() - t0

    def score(waves, lo):
        audio = clap.embed_audio(waves, [s["clip_id"] for s in specs[lo : lo + len(waves)]])
        texts = [t for j in range(len(waves)) for t in [specs[lo + j]["caption"]] + cands[lo + j]]
        return np.asarray(clap.embed_text(texts)) @ audio.T

    def bare_loop() -> float:
        t0 = time.perf_counter()
        for lo in range(0, n, bs):
            score([load_clip(s["audio_path"], 0.0, 10.24, SAMPLE_RATE, mono=True) for s in specs[lo : lo + bs]], lo)
        return time.perf_counter() - t0

    bare_before = bare_loop()  # the bare loop runs before and after the stage: drift shows
    t0 = time.perf_counter()
    parts, digests, _ = backend.plan_parts(work / "cands", work / "out")
    backend.run_parts(C.ClapSelectStage, {"clap": ccfg, "selection": C.SelectionConfig()}, parts, digests, work / "out", resources)
    stage_s = time.perf_counter() - t0
    assert len(list_parts(work / "out")) == len(list_parts(work / "cands"))

    bare_after = bare_loop()
    t0 = time.perf_counter()
    waves = [load_clip(s["audio_path"], 0.0, 10.24, SAMPLE_RATE, mono=True) for s in specs]
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for lo in range(0, n, bs):
        score(waves[lo : lo + bs], lo)
    infer_s = time.perf_counter() - t0
    return {"clips": n, "model": f"{kind} {Path(path).name}", "stage_s": stage_s, "bare_s": (bare_before + bare_after) / 2, "bare_runs": (bare_before, bare_after), "infer_s": infer_s, "decode_s": decode_s, "load_s": load_s}


# --- report ----------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--only", choices=["llm", "clap"], default=None, help="run one half")
    p.add_argument("--clips", type=int, default=512, help="LLM: clips (x --candidates prompts)")
    p.add_argument("--candidates", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=None, help="LLM: prompts per Ray Data batch (default: the config's)")
    p.add_argument("--clap", default=None, help="a LAION .pt or transformers CLAP folder (default: a random one)")
    p.add_argument("--clap-text-model", default=None, help="laion: local roberta-style folder")
    p.add_argument("--clap-size", choices=["base", "tiny"], default="base", help="the random CLAP: real size or tiny")
    p.add_argument("--clap-clips", type=int, default=160)
    p.add_argument("--clap-batch-size", type=int, default=8)
    p.add_argument("--clap-rows-per-part", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="CLAP: CPUs of the stage's actor = torch threads of the bare loop")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded Ray (default: all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    from pipeline import llm as L
    from pipeline.stage import Resources

    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    over = {"resources": Resources(batch_size=args.batch_size)} if args.batch_size else {}
    cfg = L.LLMConfig(num_candidates=args.candidates, max_tokens=args.max_tokens, **over)
    with tempfile.TemporaryDirectory() as tmp:
        clap = bench_clap(args, Path(tmp)) if args.only != "llm" else None
        llm = bench_llm(cfg, args.clips) if args.only != "clap" else None
    ray.shutdown()

    print(f"\ncaption throughput, {os.cpu_count()} CPUs, one run\n")
    if llm:
        d, s = llm["direct"], llm["stage"]
        print(f"LLM: {llm['prompts']} prompts = candidates (SmolLM2-135M-Instruct, vLLM on {L.resolve_device(cfg)}, "
              f"max_tokens={cfg.max_tokens}, batch {cfg.resources.batch_size} x {cfg.max_concurrent_batches} in flight)")
        print(f"  vLLM LLM.generate  start {d['start_s']:6.1f}s  generate {d['generate_s']:6.1f}s")
        print(f"  Ray Data stage     start {s['startup_s']:6.1f}s  first request to last caption {s['steady_s']:6.1f}s  (wall {s['wall_s']:.1f}s)")
        for name in ("steady", "wall"):
            st, di = llm[name]
            print(f"  {name:6s} candidates/s   stage {st:7.2f}   LLM.generate {di:7.2f}   ratio {st / di:5.2f}")
        print(f"  identical candidates {llm['identical']}/{llm['prompts']}   per-row errors in the stage {s['errors']}")
    if clap:
        n = clap["clips"]
        print(f"CLAP: {n} clips, {clap['model']}, {args.threads} thread(s), batch {args.clap_batch_size}")
        print(f"  stage (read, actor start, model load, decode, embed, select, write)  {n / clap['stage_s']:7.2f} clips/s")
        print(f"  bare loop (decode + embed, model load {clap['load_s']:.1f}s excluded)        {n / clap['bare_s']:7.2f} clips/s   ratio {clap['bare_s'] / clap['stage_s']:5.2f}")
        print(f"    (mean of a run before the stage, {n / clap['bare_runs'][0]:.2f} clips/s, and one after, {n / clap['bare_runs'][1]:.2f})")
        print(f"  bare inference only (decode {clap['decode_s']:.1f}s excluded)              {n / clap['infer_s']:7.2f} clips/s   ratio {clap['infer_s'] / clap['stage_s']:5.2f}")


if __name__ == "__main__":
    main()
