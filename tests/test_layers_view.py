"""Per-layer views at transformer scale: tensors grouped into modules, filtered by regex, at most 40 rows.

The layers table of a 12-block GPT-2 (148 parameter tensors) is synthetic; every grouped value is
checked against a root-sum-square computed here with pandas from the tensor names, and the update
ratio of a module against ||Δθ|| / ||θ|| of its tensors concatenated into one vector.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from dynamics.run import load_run, save_run  # noqa: E402
from figures.layers import group_layers, layers_figure  # noqa: E402
from tests.helpers import dyn_in_process  # noqa: E402

BLOCK = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
]
GPT2 = (
    ["transformer.wte.weight", "transformer.wpe.weight"]
    + [f"transformer.h.{i}.{part}" for i in range(12) for part in BLOCK]
    + ["transformer.ln_f.weight", "transformer.ln_f.bias"]
)
STEPS = np.array([20, 40, 60, 80, 100])


def gpt2_layers(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(STEPS) * len(GPT2)
    return pd.DataFrame(
        {
            "step": np.repeat(STEPS, len(GPT2)),
            "name": np.tile(GPT2, len(STEPS)),
            "grad_norm": np.exp(rng.normal(size=n)),
            "param_norm": np.exp(rng.normal(size=n)),
            "cosine": rng.uniform(-1, 1, size=n),  # a column that is no norm
        }
    )


def save_gpt2(path):
    """A finished run with a metrics table (the command line plots runs that have rows) and the layers table."""
    metrics = pd.DataFrame({"step": STEPS, "loss": 1.0 / STEPS, "grad_norm": np.ones(len(STEPS))})
    return save_run(path, {"clipper": {"kind": "NoClip"}}, metrics=metrics, layers=gpt2_layers())


def rss_oracle(frame: pd.DataFrame, column: str, key_of) -> pd.DataFrame:
    """sqrt(sum of squares) of ``column`` per (module key, step), with pandas: modules x steps."""
    keyed = frame.assign(key=frame.name.map(key_of), sq=frame[column] ** 2)
    return np.sqrt(keyed.groupby(["key", "step"]).sq.sum()).unstack("step")


def first(n: int):
    return lambda name: ".".join(name.split(".")[:n])


def check_rows(g, oracle: pd.DataFrame) -> None:
    """Every row of ``g`` equals the oracle's row for its module key."""
    assert sorted(g.keys) == sorted(oracle.index)
    np.testing.assert_array_equal(g.steps, STEPS)
    np.testing.assert_allclose(g.values, oracle.loc[g.keys, STEPS].to_numpy(), rtol=1e-12)


def test_gpt2_default_is_at_most_40_rows_of_modules_in_model_order():
    frame = gpt2_layers()
    g = group_layers(frame, "grad_norm")
    assert len(GPT2) == 148 and len(g.labels) <= 40 and g.tensors == 148
    assert g.depth == 3 and g.prefix == "transformer."
    assert g.labels == ["wte.weight", "wpe.weight", *[f"h.{i}" for i in range(12)], "ln_f.weight", "ln_f.bias"]
    assert len(set(g.labels)) == len(g.labels)
    # labels tell h.1, h.10 and h.11 apart: the shared prefix goes, the block number stays whole
    assert {"h.1", "h.10", "h.11"} <= set(g.labels)
    assert g.keys == [g.prefix + label for label in g.labels]
    check_rows(g, rss_oracle(frame, "grad_norm", first(3)))
    assert [len(m) for m in g.members] == [1, 1, *[12] * 12, 1, 1]


@pytest.mark.parametrize("depth, rows", [(1, 1), (2, 4), (4, 52), (6, 148)])
def test_an_explicit_depth_is_kept_even_beyond_40_rows(depth, rows):
    frame = gpt2_layers()
    g = group_layers(frame, "grad_norm", depth=depth)
    assert len(g.labels) == rows and g.depth == depth
    check_rows(g, rss_oracle(frame, "grad_norm", first(depth)))
    if depth == 1:
        assert g.labels == ["transformer"] and g.prefix == ""  # one row keeps its whole name
    if depth == 4:
        assert g.labels[2:6] == ["h.0.ln_1", "h.0.attn", "h.0.ln_2", "h.0.mlp"]


def test_match_filters_tensors_before_grouping():
    frame = gpt2_layers()
    g = group_layers(frame, "grad_norm", depth=3, match=r"\.mlp\.")
    assert g.labels == [f"h.{i}" for i in range(12)] and g.prefix == "transformer."
    assert all(len(m) == 4 and all(".mlp." in n for n in m) for m in g.members)
    check_rows(g, rss_oracle(frame[frame.name.str.contains(r"\.mlp\.")], "grad_norm", first(3)))
    # blocks 10 and 11 alone: 24 tensors fit, so one row each, named from the block on
    g = group_layers(frame, "grad_norm", match=r"^transformer\.h\.1[01]\.")
    assert len(g.labels) == 24 and g.labels[0] == "h.10.ln_1.weight" and g.labels[-1] == "h.11.mlp.c_proj.bias"


def test_numbered_blocks_join_into_ranges_to_fit_fewer_rows():
    frame = gpt2_layers()
    g = group_layers(frame, "grad_norm", max_rows=10)
    assert g.binned and len(g.labels) == 10
    assert g.labels == ["wte.weight", "wpe.weight", "h.0–1", "h.2–3", "h.4–5", "h.6–7", "h.8–9", "h.10–11"] + [
        "ln_f.weight",
        "ln_f.bias",
    ]

    def key(name):
        parts = name.split(".")
        if parts[1] == "h":
            lo = int(parts[2]) // 2 * 2
            return f"transformer.h.{lo}–{lo + 1}"
        return name

    check_rows(g, rss_oracle(frame, "grad_norm", key))


def test_update_ratio_of_a_module_is_its_update_norm_over_its_norm_before():
    rng = np.random.default_rng(3)
    names = ["enc.0.w", "enc.0.b", "enc.1.w", "enc.1.b", "head.w"]
    sizes = [6, 2, 6, 2, 3]
    rows, before_all, update_all = [], {}, {}
    for step in STEPS:
        for name, size in zip(names, sizes):
            before = rng.normal(size=size)
            update = 0.01 * rng.normal(size=size)
            if (step, name) == (40, "enc.0.b"):
                update[:] = 0.0  # no change: ratio 0
            if (step, name) == (60, "enc.1.b"):
                before[:] = 0.0  # zero before the update: ratio NaN
            before_all[step, name], update_all[step, name] = before, update
            s, p = np.linalg.norm(update), np.linalg.norm(before + update)
            ratio = s / np.linalg.norm(before) if np.linalg.norm(before) > 0 else np.nan
            rows.append((step, name, s, p, ratio))
    frame = pd.DataFrame(rows, columns=["step", "name", "step_size", "param_norm", "update_ratio"])
    g = group_layers(frame, "update_ratio", depth=2)
    assert g.keys == ["enc.0", "enc.1", "head.w"]
    for i, key in enumerate(g.keys):
        members = [n for n in names if n == key or n.startswith(key + ".")]
        for j, step in enumerate(STEPS):
            before = np.concatenate([before_all[step, n] for n in members])
            update = np.concatenate([update_all[step, n] for n in members])
            assert g.values[i, j] == pytest.approx(np.linalg.norm(update) / np.linalg.norm(before), rel=1e-12)
    # without step sizes a module's ratio cannot be formed; single tensors still can
    with pytest.raises(ValueError, match="without the layers column step_size"):
        group_layers(frame.drop(columns="step_size"), "update_ratio", depth=2)
    single = group_layers(frame.drop(columns="step_size"), "update_ratio")
    assert single.keys == names


def test_a_column_that_is_no_norm_is_not_combined():
    frame = gpt2_layers()
    with pytest.raises(ValueError, match="cosine is not a norm"):
        group_layers(frame, "cosine")
    g = group_layers(frame, "cosine", match=r"^transformer\.h\.0\.")  # 12 tensors: one row each
    expected = frame[frame.name.str.startswith("transformer.h.0.")].pivot(index="name", columns="step", values="cosine")
    assert all(len(m) == 1 for m in g.members)
    np.testing.assert_array_equal(g.values, expected.loc[[m[0] for m in g.members]].to_numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": 0}, "depth must be a positive integer"),
        ({"match": "("}, "not a valid regular expression"),
        ({"match": "decoder"}, "matches no parameter name; names look like: transformer.wte.weight"),
        ({"max_rows": 0}, "max_rows must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        group_layers(gpt2_layers(), "grad_norm", **kwargs)


def test_the_heatmap_shows_the_groups(tmp_path):
    run = load_run(save_gpt2(tmp_path / "gpt2"))
    fig = layers_figure([run], "grad_norm")
    try:
        (ax,) = fig.heatmap_axes
        (g,) = fig.layer_groups
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels == g.labels and len(labels) == 16  # every row named, none cut short
        (image,) = ax.images
        np.testing.assert_allclose(image.get_array(), np.log10(g.values), rtol=1e-12)
        assert ax.get_ylabel() == "transformer.…" and "148 tensors in 16 modules" in ax.get_title()
        assert "root-sum-square" in fig.axes[-1].get_ylabel()
    finally:
        plt.close(fig)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("gpt2") / "run")


def test_plot_layers_from_the_command_line(gpt2_run, tmp_path):
    from click.testing import CliRunner

    from cli.plot import plot

    out = tmp_path / "layers.png"
    args = [str(gpt2_run), "--layers", "grad_norm", "--depth", "4", "--match", r"\.attn\.", "--out", str(out)]
    r = CliRunner().invoke(plot, args)
    assert r.exit_code == 0, (r.output, r.exception)
    assert out.read_bytes().startswith(b"\x89PNG") and [p.name for p in tmp_path.iterdir()] == ["layers.png"]


BAD = {
    "depth0": (["--layers", "--depth", "0"], "--depth must be a positive integer"),
    "regex": (["--layers", "grad_norm", "--match", "("], "is not a valid regular expression"),
    "nothing": (["--layers", "grad_norm", "--match", "decoder"], "matches no parameter name"),
    "alone": (["--depth", "3"], "--depth goes with --layers"),
}


@pytest.fixture(scope="module")
def bad_results(gpt2_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad")
    return out, {k: dyn_in_process("plot", gpt2_run, *args, "--out", out / f"{k}.png") for k, (args, _) in BAD.items()}


@pytest.mark.parametrize("key", list(BAD))
def test_plot_layers_bad_input_is_one_line(bad_results, key):
    out, results = bad_results
    (code, stderr), message = results[key], BAD[key][1]
    assert code == 2, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("dyn: error: ") and message in stderr, stderr
    assert not list(out.iterdir())
