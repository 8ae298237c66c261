"""cluster_quantize: compiled kernels against the reference, the official ids, and bad inputs."""
import pytest
import torch

from nvg.ops import cluster_quantize, cluster_quantize_ref, prepare_codebook

TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def sample_inputs(device):
    """(id, residual, labels, n, codebook): random and awkward shapes, duplicated codes, empty clusters."""
    g = torch.Generator().manual_seed(1)
    cases = []
    for B, N, C, n, V in [(1, 1, 1, 1, 1), (3, 4, 5, 2, 7), (1, 2, 3, 2, 4096), (5, 16, 7, 8, 33),
                          (2, 256, 32, 64, 4096), (4, 256, 13, 256, 100)]:
        res = torch.randn(B, N, C, generator=g)
        labels = torch.randint(0, n, (B, N), generator=g)
        cases.append((f"randn-B{B}-N{N}-C{C}-n{n}-V{V}", res, labels, n, torch.randn(V, C, generator=g) * 0.5))
    # duplicated codes and dyadic values: exact ties must go to the lowest index
    code = torch.randint(-3, 4, (5, 3), generator=g).float() / 4
    cases.append(("dup-codes", torch.randint(-3, 4, (2, 8, 3), generator=g).float() / 4,
                  torch.arange(8).repeat(2, 1) % 4, 4, code.repeat(3, 1)))
    # clusters with no member (mean 0), large magnitudes
    cases.append(("empty-clusters", torch.randn(2, 6, 4, generator=g), torch.zeros(2, 6, dtype=torch.long), 5,
                  torch.randn(9, 4, generator=g)))
    cases.append(("large", torch.randn(2, 16, 6, generator=g) * 1e6, torch.randint(0, 4, (2, 16), generator=g), 4,
                  torch.randn(50, 6, generator=g) * 1e6))
    cases.append(("float64", torch.randn(2, 8, 3, generator=g, dtype=torch.float64),
                  torch.randint(0, 3, (2, 8), generator=g), 3, torch.randn(17, 3, generator=g, dtype=torch.float64)))
    return [(name, r.to(device), lab.to(device), n, E.to(device)) for name, r, lab, n, E in cases]


@pytest.mark.parametrize("idx", range(len(sample_inputs("cpu"))), ids=[c[0] for c in sample_inputs("cpu")])
def test_matches_reference(device, idx):
    name, res, labels, n, E = sample_inputs(device)[idx]
    ids, means = cluster_quantize(res, labels, n, E)
    ref_ids, ref_means = cluster_quantize_ref(res.cpu(), labels.cpu(), n, E.cpu())
    assert ids.dtype == torch.long and ids.shape == (res.shape[0], n) and ids.device == res.device
    assert means.dtype == res.dtype and means.shape == (res.shape[0], n, res.shape[2])
    assert torch.equal(ids.cpu(), ref_ids), name
    torch.testing.assert_close(means.cpu(), ref_means, **TOL[res.dtype])


def test_dup_codes_take_lowest_index():
    _, res, labels, n, E = [c for c in sample_inputs("cpu") if c[0] == "dup-codes"][0]
    ids, _ = cluster_quantize(res, labels, n, E)
    assert (ids < 5).all()  # the codebook is 3 copies of 5 codes: always the first copy


def test_official_reference_ids(nvg_reference):
    """The official per-stage residual quantization (reference b), driven by our op: tokens identical."""
    ref = nvg_reference
    E = ref["quant.state_dict"]["embedding.weight"]
    canvas, labels, f = ref["quant.canvas"], ref["quant.labels"], ref["clustering.f"]
    stage_ids = []
    for i in range(labels.shape[1]):
        residual = (f - canvas[:, i]).contiguous()  # f_rest before stage i
        ids, _ = cluster_quantize(residual, labels[:, i].contiguous(), 2**i, E)
        stage_ids.append(ids)
        assert torch.equal(ids.gather(1, labels[:, i]), ref["quant.tokens"][:, i])
    assert torch.equal(torch.cat(stage_ids, 1), ref["quant.tokens_per_cluster"])


def test_opcheck():
    res, labels, E = torch.randn(2, 8, 3), torch.randint(0, 4, (2, 8)), torch.randn(6, 3)
    torch.library.opcheck(torch.ops.nvg.cluster_quantize.default, (res, labels, 4, E))


def test_compile_fullgraph():
    res, labels, E = torch.randn(2, 8, 3), torch.randint(0, 4, (2, 8)), torch.randn(6, 3)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fn(r, lab, e):
        ids, means = cluster_quantize(r + 1, lab, 4, e)
        return ids, means * 2

    ids, means = fn(res, labels, E)
    ids_e, means_e = cluster_quantize(res + 1, labels, 4, E)
    assert torch.equal(ids, ids_e) and torch.equal(means, means_e * 2)


@pytest.mark.cuda
def test_cuda_matches_cpu_full_size():
    res, labels, E = torch.randn(256, 256, 32), torch.randint(0, 256, (256, 256)), torch.randn(4096, 32) * 0.3
    ids, means = cluster_quantize(res.cuda(), labels.cuda(), 256, E.cuda())
    ids_c, means_c = cluster_quantize(res, labels, 256, E)
    assert torch.equal(ids.cpu(), ids_c)
    torch.testing.assert_close(means.cpu(), means_c, atol=1e-5, rtol=1e-5)


def _args(**kw):
    a = dict(residual=torch.randn(2, 8, 3), labels=torch.randint(0, 4, (2, 8)), num_clusters=4,
             codebook=torch.randn(6, 3))
    a.update(kw)
    return a["residual"], a["labels"], a["num_clusters"], a["codebook"]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(residual=torch.randn(8, 3)), "residual must be a 3-D"),
        (dict(labels=torch.zeros(2, 8, 1, dtype=torch.long)), "labels must be a 2-D"),
        (dict(codebook=torch.randn(6)), "codebook must be a 2-D"),
        (dict(codebook=torch.randn(6, 4)), "C = 4"),
        (dict(labels=torch.zeros(2, 7, dtype=torch.long)), "does not match"),
        (dict(labels=torch.full((2, 8), 4)), r"\[0, num_clusters = 4\)"),
        (dict(labels=torch.full((2, 8), -1)), r"\[0, num_clusters = 4\)"),
        (dict(labels=torch.zeros(2, 8, dtype=torch.int32)), "int64"),
        (dict(residual=torch.randint(0, 3, (2, 8, 3))), "floating-point"),
        (dict(residual=torch.randn(0, 8, 3), labels=torch.zeros(0, 8, dtype=torch.long)), "empty batch"),
        (dict(num_clusters=0), "positive"),
        (dict(codebook=torch.randn(0, 3)), "empty"),
        (dict(residual=torch.randn(2, 3, 8).transpose(1, 2)), "contiguous"),
        (dict(codebook=torch.randn(3, 6).T), "contiguous"),
        (dict(residual=torch.full((2, 8, 3), float("nan"))), "NaN"),
        (dict(residual=torch.randn(2, 8, 3, device="meta")), "same device"),
    ],
    ids=["res-rank", "lab-rank", "cb-rank", "C-mismatch", "N-mismatch", "lab-high", "lab-neg", "lab-int32",
         "res-int", "B0", "n0", "V0", "res-noncontig", "cb-noncontig", "nan", "devices"],
)
def test_bad_inputs(kw, match):
    with pytest.raises(RuntimeError, match=match):
        cluster_quantize(*_args(**kw))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("B, N, C, n, V", [(1, 140, 40, 140, 1000), (2, 64, 1, 16, 1), (3, 77, 32, 64, 4097)])
def test_cuda_shapes_and_dtypes_match_cpu(B, N, C, n, V, dtype):
    res, E = torch.randn(B, N, C).to(dtype), torch.randn(V, C).to(dtype)
    labels = torch.randint(0, n, (B, N))
    ids, means = cluster_quantize(res.cuda(), labels.cuda(), n, E.cuda())
    ids_c, means_c = cluster_quantize(res, labels, n, E)
    assert torch.equal(ids.cpu(), ids_c)
    torch.testing.assert_close(means.cpu(), means_c)


@pytest.mark.cuda
@pytest.mark.parametrize("idx", range(len(sample_inputs("cpu"))), ids=[c[0] for c in sample_inputs("cpu")])
def test_cuda_label_errors_and_stream(idx):
    name, res, labels, n, E = sample_inputs("cpu")[idx]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        ids, _ = cluster_quantize(res.cuda(), labels.cuda(), n, E.cuda())
    stream.synchronize()
    assert torch.equal(ids.cpu(), cluster_quantize(res, labels, n, E)[0]), name
    with pytest.raises(RuntimeError, match=r"\[0, num_clusters"):
        cluster_quantize(res.cuda(), torch.full_like(labels, n).cuda(), n, E.cuda())


def test_float32_overflow_range_is_rescored_exactly():
    """|e|^2 near 1e36: float32 scores would overflow; the op must still return the exact nearest codes."""
    g = torch.Generator().manual_seed(3)
    res = torch.randn(2, 16, 4, generator=g, dtype=torch.float64) * 1e17
    E = torch.randn(40, 4, generator=g, dtype=torch.float64) * 1e17
    labels = torch.randint(0, 8, (2, 16), generator=g)
    assert torch.equal(cluster_quantize(res, labels, 8, E)[0], cluster_quantize_ref(res, labels, 8, E)[0])


# ---- codebook prepared once per codebook version; validation that can be skipped
@pytest.mark.parametrize("idx", range(len(sample_inputs("cpu"))), ids=[c[0] for c in sample_inputs("cpu")])
def test_prepared_codebook_gives_the_same_result(device, idx):
    name, res, labels, n, E = sample_inputs(device)[idx]
    prepared = prepare_codebook(E)
    ids, means = cluster_quantize(res, labels, n, E, prepared)
    ids_v, means_v = cluster_quantize(res, labels, n, E, prepared, validate=False)
    ids_e, means_e = cluster_quantize(res, labels, n, E)
    assert torch.equal(ids, ids_e) and torch.equal(ids_v, ids_e) and torch.equal(means, means_e), name
    assert torch.equal(means_v, means_e)


def test_prepare_opcheck_and_fake_shapes(device):
    E = torch.randn(37, 5, device=device)
    torch.library.opcheck(torch.ops.nvg.cluster_quantize_prepare.default, (E,))
    prepared = prepare_codebook(E)
    res, labels = torch.randn(2, 8, 5, device=device), torch.randint(0, 4, (2, 8), device=device)
    torch.library.opcheck(torch.ops.nvg.cluster_quantize.default, (res, labels, 4, E, prepared, False))


@pytest.mark.parametrize("what", ["other-codebook", "too-few", "other-dtype"])
def test_rejects_a_foreign_preparation(what):
    res, labels, E = torch.randn(2, 8, 3), torch.randint(0, 4, (2, 8)), torch.randn(6, 3)
    prepared = prepare_codebook(E)
    if what == "other-codebook":
        prepared = prepare_codebook(torch.randn(40, 3))
    elif what == "too-few":
        prepared = prepared[:3]
    else:
        prepared = [t.half() if t.dtype == torch.float32 else t for t in prepared]
    with pytest.raises(RuntimeError, match="prepare"):
        cluster_quantize(res, labels, 4, E, prepared)


def test_validate_false_skips_the_finiteness_check():
    res, labels, E = torch.randn(2, 8, 3), torch.randint(0, 4, (2, 8)), torch.randn(6, 3)
    res[0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        cluster_quantize(res, labels, 4, E)
    ids, _ = cluster_quantize(res, labels, 4, E, validate=False)
    assert ids.shape == (2, 4) and ((ids >= 0) & (ids < 6)).all()
    with pytest.raises(RuntimeError, match="num_clusters"):  # the CPU checks the label range in any case
        cluster_quantize(torch.randn(2, 8, 3), torch.full((2, 8), 4), 4, E, validate=False)


@pytest.mark.cuda
def test_tokenizer_quantization_replays_in_a_cuda_graph():
    """quantize.encode(validate=False) has no host sync: captured once, replayed with identical ids."""
    from nvg.tokenizer import Tokenizer

    tok = Tokenizer("tiny-ae-32px-8x8").cuda().eval()
    x = torch.rand(3, 3, 32, 32, device="cuda") * 2 - 1
    with torch.no_grad():
        f = tok.encode_latent(x)
    expected = tok.quantize.encode(f)  # validated, eager
    static_f = f.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        tok.quantize.encode(static_f, validate=False)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tok.quantize.encode(static_f, validate=False)
    static_f.zero_()
    static_f.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured.tokens, expected.tokens):
        assert torch.equal(a, b)
    assert torch.equal(captured.labels, expected.labels)
