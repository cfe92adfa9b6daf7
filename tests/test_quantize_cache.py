"""Quantize-on-load cache (checkpoint/cache.py) and the size budget (checkpoint/budget.py, `lowbit quantize
--max-size`) on tiny seeded FLUX.1 / FLUX.2 / text-encoder files, without ComfyUI (the nodes on top of them:
tests/test_comfyui_quantize_on_load.py)."""
import errno
import json
import os
import shutil

import pytest
import torch
from tiny_models import FAST, TINY_QWEN3_CONFIG, write_tiny_flux, write_tiny_flux2, write_tiny_llm, write_tiny_t5

from comfyui_lowbit import checkpoint, cli
from comfyui_lowbit.checkpoint import budget, cache
from comfyui_lowbit.checkpoint.families import FLUX1

SMALL = dict(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1)  # head dim 128, one block of each kind


@pytest.fixture
def counted(monkeypatch):
    """Counts quantize_file calls made through the cache."""
    calls = []
    real = checkpoint.convert.quantize_file

    def wrapper(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint.convert, "quantize_file", wrapper)
    return calls


def _files(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# ---- the source key ---------------------------------------------------------------------------------------------

def test_source_key_follows_content_not_name_or_time(tmp_path):
    a = write_tiny_flux(tmp_path / "a.safetensors", **SMALL)
    key = cache.source_key(a)
    b = tmp_path / "copy" / "renamed.safetensors"
    b.parent.mkdir()
    shutil.copy(a, b)
    os.utime(b, (1, 1))
    assert cache.source_key(b) == key  # a copy / move / re-download finds its entry
    assert cache.source_key(write_tiny_flux(tmp_path / "c.safetensors", seed=1, **SMALL)) != key  # fine-tune-like
    assert cache.source_key(write_tiny_flux(tmp_path / "d.safetensors", dtype=torch.float16, **SMALL)) != key
    data = bytearray(open(a, "rb").read())
    data[-1] ^= 0xFF  # the last byte of the last tensor: in its end window
    (tmp_path / "e.safetensors").write_bytes(bytes(data))
    assert cache.source_key(tmp_path / "e.safetensors") != key
    (tmp_path / "f.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"f\.safetensors: not a readable safetensors file: .* \(truncated"):
        cache.source_key(tmp_path / "f.safetensors")


def test_source_key_reads_a_sample_not_the_file(tmp_path, monkeypatch):
    """The key reads the header and 3 windows of 4 KiB per tensor: far less than the file once tensors are large."""
    path = tmp_path / "big.safetensors"
    from safetensors.torch import save_file

    save_file({f"t{i}": torch.randn(512, 1024) for i in range(8)}, str(path))  # 16 MB
    read = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            out = self.f.read(n)
            read.append(len(out))
            return out

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr(cache, "open", lambda p, m="r": Counting(real_open(p, m)), raising=False)
    cache.source_key(path)
    assert sum(read) < 8 * 3 * cache.WINDOW + 4096 < os.path.getsize(path) / 100


# ---- hits, misses, refusals -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    return {"flux1": write_tiny_flux(d / "flux1.safetensors", **SMALL),
            "flux2_fp8": write_tiny_flux2(d / "flux2_fp8.safetensors", dtype=torch.float8_e4m3fn, **SMALL)}


@pytest.mark.parametrize("name", ["flux1", "flux2_fp8"])
def test_miss_then_hit_then_option_miss(tmp_path, sources, counted, name):
    c = cache.QuantCache(tmp_path / "cache")
    first = cache.quantize_cached(sources[name], c, "svdq_w4a4", options=FAST)
    assert not first.hit and counted == [first.path] and first.summary["model"] == "flux"
    info = checkpoint.read_info(first.path)
    assert info.metadata[cache.CACHE_KEY] == first.key and info.metadata[cache.CACHE_SOURCE] == os.path.basename(sources[name])
    second = cache.quantize_cached(sources[name], c, "svdq_w4a4", options=FAST)
    assert second.hit and second.path == first.path and len(counted) == 1  # no quantization ran
    third = cache.quantize_cached(sources[name], c, "ternary", options=FAST)
    assert not third.hit and third.path != first.path and len(counted) == 2
    assert [e.path for e in c.entries()] == [first.path, third.path]  # least recently used first


def test_changed_source_misses(tmp_path, counted):
    src = tmp_path / "model.safetensors"
    c = cache.QuantCache(tmp_path / "cache")
    write_tiny_flux(src, **SMALL)
    a = cache.quantize_cached(src, c, "svdq_w4a4", options=FAST)
    write_tiny_flux(src, seed=3, **SMALL)  # same name, same shapes, other weights
    b = cache.quantize_cached(src, c, "svdq_w4a4", options=FAST)
    assert not b.hit and b.key != a.key and len(counted) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other key"])
def test_damaged_entry_is_refused_and_rebuilt(tmp_path, sources, counted, caplog, damage):
    c = cache.QuantCache(tmp_path / "cache")
    first = cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST)
    data = open(first.path, "rb").read()
    if damage == "truncated":
        open(first.path, "wb").write(data[: len(data) * 2 // 3])
    elif damage == "garbage":
        open(first.path, "wb").write(b"\x00" * 64)
    else:  # another entry's file under this entry's name
        other = cache.quantize_cached(sources["flux1"], c, "ternary", options=FAST)
        os.replace(other.path, first.path)
    again = cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST)
    assert not again.hit and again.path == first.path and counted[-1] == first.path
    assert "refused" in caplog.text and os.path.basename(first.path) in caplog.text
    checkpoint.load_checkpoint(again.path)  # whole and valid again


def test_never_replaces_or_removes_what_is_not_its_own(tmp_path, sources):
    c = cache.QuantCache(tmp_path / "cache")
    got = cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST)
    (tmp_path / "cache" / "notes.safetensors").write_bytes(b"not a cache file")
    (tmp_path / "cache" / "link.safetensors").symlink_to(got.path)
    os.remove(got.path)
    os.mkdir(got.path)  # a folder where the entry goes
    with pytest.raises(FileExistsError, match="is not a regular file; the cache never replaces one"):
        cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST)
    os.rmdir(got.path)
    assert c.clear() == [] and _files(tmp_path / "cache") == ["link.safetensors", "notes.safetensors"]
    with pytest.raises(ValueError, match="not a file of the cache folder"):
        c.discard(str(tmp_path / "cache" / "link.safetensors"))


def test_size_limit_evicts_least_recently_used(tmp_path, sources, counted):
    c = cache.QuantCache(tmp_path / "cache")
    a = cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST)
    b = cache.quantize_cached(sources["flux1"], c, "ternary", options=FAST)
    os.utime(a.path, (1, 1))
    os.utime(b.path, (2, 2))
    assert cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST).hit  # a is used now: b is older
    limit = os.path.getsize(a.path) + checkpoint.convert.output_estimate(sources["flux2_fp8"], "svdq_w4a4") + 1000
    small = cache.QuantCache(tmp_path / "cache", limit=limit)
    d = cache.quantize_cached(sources["flux2_fp8"], small, "svdq_w4a4", options=FAST)
    assert {e.path for e in small.entries()} == {a.path, d.path}  # b went, the new one and the recent one stay
    with pytest.raises(ValueError, match=r"more than the cache's size limit of 0\.00 MB"):
        cache.quantize_cached(sources["flux1"], cache.QuantCache(tmp_path / "cache", limit=1000), "w4a16")
    assert len(counted) == 3  # refused before any work
    stale = tmp_path / "cache" / ".lowbit-dead.tmp"
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    small.make_room(0)
    assert not stale.exists()


def test_full_disk_leaves_no_partial_file(tmp_path, sources, monkeypatch, counted):
    """Known before: no room on the disk (after evicting what can go) -> one line naming the folder, no work.
    During the write: the disk fills -> the temp file is removed; no entry, no partial file; the next load builds."""
    c = cache.QuantCache(tmp_path / "cache")
    folder = str(tmp_path / "cache")
    real_usage = shutil.disk_usage
    kept = cache.quantize_cached(sources["flux1"], c, "ternary", options=FAST)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(OSError, match=r"cache: the quantized model needs about .* MB but the disk has 0\.00 MB free "
                                      r"\(the cache's entries hold"):
        cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST)
    assert _files(folder) == [os.path.basename(kept.path)]  # nothing evicted in vain, no output
    c.discard(kept.path)
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    from comfyui_lowbit.checkpoint import lowbit_file

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lowbit_file, "save_file", full)
    with pytest.raises(OSError, match="No space left|disk is full"):
        cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST)
    assert _files(folder) == []
    monkeypatch.undo()
    got = cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST)
    assert not got.hit and _files(folder) == [os.path.basename(got.path)]
    # room only once the older entry goes: it is evicted, then the check before the first layer passes
    size = os.path.getsize(got.path)
    need = checkpoint.convert.output_estimate(sources["flux1"], "ternary", 64)
    assert need - size < 2_000_000 < need
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(
        free=2_000_000 if os.path.exists(got.path) else 10 * need))
    other = cache.quantize_cached(sources["flux1"], c, "ternary", options=FAST)
    assert _files(folder) == [os.path.basename(other.path)]


def test_cache_cli_lists_trims_and_clears(tmp_path, sources, capsys):
    c = cache.QuantCache(tmp_path / "cache")
    a = cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", options=FAST)
    cache.quantize_cached(sources["flux1"], c, "ternary", options=FAST)
    os.utime(a.path, (1, 1))
    assert cli.main(["cache", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and "(from flux1.safetensors)" in out and out.index(".svdq_w4a4.") < out.index(".ternary.")
    assert cli.main(["cache", str(tmp_path / "cache"), "--limit", str(os.path.getsize(a.path) * 1.5 / 1e9)]) == 0
    assert "removed 1 entries" in capsys.readouterr().out and not os.path.exists(a.path)
    assert cli.main(["cache", str(tmp_path / "cache"), "--clear"]) == 0
    assert _files(tmp_path / "cache") == []
    assert cli.main(["cache", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such folder" in capsys.readouterr().err


# ---- the size budget ------------------------------------------------------------------------------------------

def _measured(path, src, family, fmt):
    """Summed output error of a lowbit file's quantizable layers against the source (16-bit layers: their bf16
    copy), measured here from the file, with the budget's metric; and the file's size."""
    from comfyui_lowbit.checkpoint.convert import FluxSource, _Source, _plan

    sd, info = checkpoint.load_checkpoint(path)
    packed = checkpoint.packed_layers(sd, info)
    _, plan, _, _, _ = _plan(_Source(src))
    fs = FluxSource.__new__(FluxSource)
    fs.source, fs.plan = _Source(src), plan
    total = 0.0
    for layer in {k.rpartition(".")[0] for k in plan if k.endswith(".weight")}:
        if not budget.candidates(family, layer, fmt):
            continue
        t = fs.tensors(layer + ".")
        w, b = t["weight"], t.get("bias")
        x = budget.synthetic_rows(layer, w.shape[1], bool(family.layer_options(layer, "svdq_w4a4")))
        total += budget.output_error(packed.get(layer), w, b, x)
    return total, os.path.getsize(path)


@pytest.mark.parametrize("model,fmt,between", [("flux1", "svdq_w4a4", 0.4), ("flux1", "ternary", 0.1),
                                               ("flux2", "svdq_w4a4", 0.6)])
def test_budget_fits_and_beats_every_uniform_plan_that_fits(tmp_path, model, fmt, between):
    """The chosen plan's file fits the budget; its summed layer error, measured from the written files, is no worse
    than that of each uniform plan (the format's own, all w4a16) whose file fits too. Budgets lie `between` the
    format's own plan and the 16-bit model, so a uniform plan fits and the 16-bit one does not."""
    write = write_tiny_flux if model == "flux1" else write_tiny_flux2
    src = write(tmp_path / "src.safetensors", **SMALL)
    _, config, family = checkpoint.inspect_source(src)
    own = sum(r["bytes"] for r in family.plan(config, fmt).values())
    bf16 = 2 * sum(r["params"] for r in family.plan(config, fmt).values())
    max_bytes = int(own + between * (bf16 - own))
    mb = max_bytes / 1e6
    out = tmp_path / "budget.safetensors"
    s = checkpoint.quantize_file(src, out, fmt, rank=checkpoint.DEFAULT_RANK[fmt], options=FAST, max_bytes=max_bytes)
    err, size = _measured(out, src, family, fmt)
    assert size <= max_bytes and s["output_bytes"] == size
    uniforms = {}
    for name, f in ((fmt, fmt), ("w4a16", "w4a16")):
        path = tmp_path / f"{name}.safetensors"
        checkpoint.quantize_file(src, path, f, rank=checkpoint.DEFAULT_RANK[f], options=FAST)
        uniforms[name] = _measured(path, src, family, fmt)
    fits = {n: e for n, (e, sz) in uniforms.items() if sz <= max_bytes}
    assert fits, uniforms
    print(f"{model} {fmt} budget {mb} MB: plan {size / 1e6:.2f} MB error {err:.4f}; uniform "
          + ", ".join(f"{n} {sz / 1e6:.2f} MB error {e:.4f}" for n, (e, sz) in uniforms.items()))
    assert all(err <= e * (1 + 1e-6) for e in fits.values()), (err, uniforms)
    assert err < min(fits.values())  # the budget's extra bytes bought something
    plan = json.loads(checkpoint.read_info(str(out)).metadata["lowbit.plan"])
    assert plan["max_bytes"] == max_bytes and abs(plan["error"] - err) < 1e-3 * max(err, 1e-3)
    formats = {f for f, _ in plan["layers"].values()}
    assert len(formats) > 1  # mixed: the loaders read each layer's own format
    checkpoint.load_checkpoint(str(out))


def test_budget_on_a_text_encoder_and_bad_budgets(tmp_path, capsys):
    te = write_tiny_llm(tmp_path / "qwen.safetensors", {**TINY_QWEN3_CONFIG, "num_hidden_layers": 2})
    sizes = {}
    for f in ("w4a16",):
        checkpoint.quantize_file(te, tmp_path / "w4a16.safetensors", f)
        sizes[f] = os.path.getsize(tmp_path / "w4a16.safetensors")
    max_bytes = sizes["w4a16"] + 200_000
    s = checkpoint.quantize_file(te, tmp_path / "b.safetensors", "w4a16", max_bytes=max_bytes)
    assert s["output_bytes"] <= max_bytes and s["plan"]["error"] < s["plan"]["uniform"]["w4a16"]["error"]
    assert {f for f, _ in s["plan"]["layers"].values()} == {"w4a16", "16-bit"}
    # CLI: below the smallest plan -> one line before any layer, no output; inspect shows a plan
    src = write_tiny_t5(tmp_path / "t5.safetensors")
    assert cli.main(["quantize", src, str(tmp_path / "x.safetensors"), "--format", "w4a16", "--max-size", "0.0001"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "size budget 0.000 GB is below the smallest checkpoint of this model" in err
    assert not (tmp_path / "x.safetensors").exists()
    assert cli.main(["quantize", src, str(tmp_path / "x.safetensors"), "--format", "w4a16", "--max-size", "0"]) == 1
    assert "--max-size must be > 0 GB" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "b.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "size budget" in out and "uniform w4a16" in out and "layers not in the format's own plan" in out
    # before any work: what a budget can choose for a known model, from shapes alone
    assert cli.main(["inspect", "--plan", "flux1:dev", "--max-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "--max-size 10 GB with svdq_w4a4: a budget chooses between 6.42 GB and 23.80 GB; a mix fits" in out
    assert cli.main(["inspect", "--plan", "flux2_te:mistral3-24b", "--max-size", "10"]) == 0
    assert "between 13.15 GB and 45.80 GB; below the smallest: refused" in capsys.readouterr().out


def test_choose_is_greedy_by_error_per_byte_and_fits():
    """On random option tables: the plan fits, and it is within the optimum's reach: never worse than the best
    uniform plan that fits, and close to the exhaustive optimum."""
    import itertools

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        options = {}
        for i in range(5):
            small = int(torch.randint(10, 50, (1,), generator=g))
            errs = sorted(torch.rand(3, generator=g).tolist(), reverse=True)
            options[f"l{i}"] = [budget.Option("a", small, errs[0]), budget.Option("b", 2 * small, errs[1]),
                                budget.Option(None, 5 * small, errs[2] / 10)]
        room = int(sum(o[0].bytes for o in options.values()) * (1.2 + trial / 10))
        chosen = budget.choose(options, room)
        assert budget.plan_bytes(chosen) <= room
        best = min(sum(o.error for o in combo) for combo in itertools.product(*options.values())
                   if sum(o.bytes for o in combo) <= room)
        assert budget.plan_error(chosen) <= best * 1.5 + 1e-9


def test_calibration_file_is_part_of_the_key_and_drives_the_budget(tmp_path, sources, counted):
    """Another calibration file is another entry; with a budget, layers the file has samples for are measured on its
    held-out rows, the others on the seeded rows (the plan says which)."""
    from comfyui_lowbit.quant_ops import InputRecorder
    from tiny_models import tiny_flux_state_dict

    sd16 = tiny_flux_state_dict(**SMALL)
    files = []
    for seed in (0, 1):
        rec = InputRecorder(tokens=64)
        g = torch.Generator().manual_seed(seed)
        for name in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"):
            k = sd16[f"{name}.weight"].shape[1]
            rec.record(name, torch.randn(2, 40, k, generator=g))
        files.append(checkpoint.save_calibration(str(tmp_path / f"calib{seed}.safetensors"), rec.tensors(), samples=2,
                                                 tokens=64))
    c = cache.QuantCache(tmp_path / "cache")
    a = cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", calib=files[0], options=FAST)
    assert cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", calib=files[0], options=FAST).hit
    b = cache.quantize_cached(sources["flux1"], c, "svdq_w4a4", calib=files[1], options=FAST)
    assert not a.hit and not b.hit and a.key != b.key and len(counted) == 2
    s = checkpoint.quantize_file(sources["flux1"], tmp_path / "budget.safetensors", "svdq_w4a4", calib=files[0],
                                 options=FAST, max_bytes=1_700_000)
    assert "held-out calibration rows" in s["plan"]["metric"] and "256 seeded N(0, 1) rows" in s["plan"]["metric"]
    assert s["output_bytes"] <= 1_700_000 and set(s["layer_errors"]) <= {"double_blocks.0.img_attn.qkv",
                                                                          "single_blocks.0.linear2"}
