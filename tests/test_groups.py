"""hidlr.groups: exact membership by parameter name on real models, the shared guarantees,
errors that name what is wrong, and the output-unit split's exactness."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from hidlr.experiments.models import (
    MLP,
    NAM,
    LoRALinear,
    MixtureOfExperts,
    MultiHead,
    SmallCNN,
    TokenTransformer,
)
from hidlr.groups import (
    GroupSummary,
    UnitSplitLinear,
    by_depth,
    by_lora,
    by_output_unit,
    by_patterns,
    by_role,
    by_subnetwork,
    check_groups,
    find_head,
    format_groups,
    merge_output_units,
    split_output_units,
    summarize_groups,
)

Groups = list[dict[str, Any]]


def names(model: nn.Module, groups: Groups) -> dict[str, list[str]]:
    """Group name -> parameter names, looked up by identity (independent of the module)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: [by_id[id(p)] for p in g["params"]] for g in groups}


def transformer(layers: int = 2) -> TokenTransformer:
    torch.manual_seed(0)
    return TokenTransformer(vocab=10, n_classes=3, d_model=8, heads=2, layers=layers)


def layer(i: int, *parts: str) -> list[str]:
    return [f"encoder.layers.{i}.{p}" for p in parts]


LAYER_PARAMS = (
    "self_attn.in_proj_weight",
    "self_attn.in_proj_bias",
    "self_attn.out_proj.weight",
    "self_attn.out_proj.bias",
    "linear1.weight",
    "linear1.bias",
    "linear2.weight",
    "linear2.bias",
    "norm1.weight",
    "norm1.bias",
    "norm2.weight",
    "norm2.bias",
)
LAYER_NORMS = ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
LAYER_BIASES = (
    "self_attn.in_proj_bias",
    "self_attn.out_proj.bias",
    "linear1.bias",
    "linear2.bias",
)
LAYER_MATRICES = (
    "self_attn.in_proj_weight",
    "self_attn.out_proj.weight",
    "linear1.weight",
    "linear2.weight",
)


# -- exact membership on real models ------------------------------------------------------------


def test_by_role_four_way_on_a_transformer() -> None:
    model = transformer()
    assert find_head(model) == "head"
    assert names(model, by_role(model)) == {
        "head": ["head.weight", "head.bias"],
        "norm": [*layer(0, *LAYER_NORMS), *layer(1, *LAYER_NORMS), "norm.weight", "norm.bias"],
        "bias": [*layer(0, *LAYER_BIASES), *layer(1, *LAYER_BIASES)],
        "rest": ["pos", "embed.weight", *layer(0, *LAYER_MATRICES), *layer(1, *LAYER_MATRICES)],
    }


def test_by_role_precedence_follows_the_order_of_roles() -> None:
    model = transformer(layers=1)
    # alone, "bias" collects every bias, the norms' and the head's included
    assert names(model, by_role(model, "bias"))["bias"] == [
        "encoder.layers.0.self_attn.in_proj_bias",
        "encoder.layers.0.self_attn.out_proj.bias",
        "encoder.layers.0.linear1.bias",
        "encoder.layers.0.linear2.bias",
        "encoder.layers.0.norm1.bias",
        "encoder.layers.0.norm2.bias",
        "norm.bias",
        "head.bias",
    ]
    bias_first = names(model, by_role(model, ("bias", "head"), rest="body"))
    assert bias_first["head"] == ["head.weight"]
    assert "head.bias" in bias_first["bias"]
    assert list(bias_first) == ["bias", "head", "body"]


def test_by_role_on_a_cnn_with_batchnorm() -> None:
    torch.manual_seed(0)
    model = SmallCNN(n_classes=3, channels=4)
    assert names(model, by_role(model)) == {
        "head": ["head.weight", "head.bias"],
        "norm": ["body.1.weight", "body.1.bias", "body.5.weight", "body.5.bias"],
        "bias": ["body.0.bias", "body.4.bias"],
        "rest": ["body.0.weight", "body.4.weight"],
    }
    assert names(model, by_role(model, "norm")) == {
        "norm": ["body.1.weight", "body.1.bias", "body.5.weight", "body.5.bias"],
        "rest": [
            "body.0.weight",
            "body.0.bias",
            "body.4.weight",
            "body.4.bias",
            "head.weight",
            "head.bias",
        ],
    }


def test_by_role_with_a_named_head_of_several_modules() -> None:
    torch.manual_seed(0)
    model = MultiHead(d_in=4, n_tasks=3, hidden=5)
    with pytest.raises(ValueError, match=r"inside the ModuleList 'heads'.*head='heads'"):
        by_role(model, "head")
    got = names(model, by_role(model, "head", head="heads"))
    heads = [f"heads.{i}.{k}" for i in range(3) for k in ("weight", "bias")]
    assert got == {
        "head": heads,
        "rest": ["trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias"],
    }
    by_list = by_role(
        model, "head", head=[model.heads[0], "heads.1", "heads.2.weight", "heads.2.bias"]
    )
    assert names(model, by_list) == got


def test_by_depth_on_a_transformer_puts_embeddings_before_and_head_after() -> None:
    model = transformer()
    assert names(model, by_depth(model)) == {
        "input": ["pos", "embed.weight"],
        "encoder.layers.0": layer(0, *LAYER_PARAMS),
        "encoder.layers.1": layer(1, *LAYER_PARAMS),
        "output": ["norm.weight", "norm.bias", "head.weight", "head.bias"],
    }


def test_by_depth_on_a_cnn_and_an_mlp() -> None:
    torch.manual_seed(0)
    cnn = SmallCNN(n_classes=3, channels=4)
    body = [f"body.{i}.{k}" for i in (0, 1, 4, 5) for k in ("weight", "bias")]
    # no block list: one group per top-level child
    assert names(cnn, by_depth(cnn)) == {"body": body, "head": ["head.weight", "head.bias"]}
    assert names(cnn, by_depth(cnn, "body")) == {
        **{f"body.{i}": [f"body.{i}.weight", f"body.{i}.bias"] for i in (0, 1, 4, 5)},
        "output": ["head.weight", "head.bias"],
    }
    mlp = MLP([3, 4, 5, 2])
    assert names(mlp, by_depth(mlp)) == {f"{i}": [f"{i}.weight", f"{i}.bias"] for i in (0, 2, 4)}
    assert find_head(mlp) == "4"


class EncoderDecoder(nn.Module):
    """Two block lists with a norm between them, like T5."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.encoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.mid_norm = nn.LayerNorm(4)
        self.decoder = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.out = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in [*self.encoder, self.mid_norm, *self.decoder]:
            h = block(h)
        return self.out(h)


def test_by_depth_with_two_block_lists_names_the_gap() -> None:
    model = EncoderDecoder()
    lin = ["weight", "bias"]
    expected = {
        "input": ["embed.weight"],
        **{f"encoder.{i}": [f"encoder.{i}.{k}" for k in lin] for i in range(2)},
        "between0": ["mid_norm.weight", "mid_norm.bias"],
        **{f"decoder.{i}": [f"decoder.{i}.{k}" for k in lin] for i in range(2)},
        "output": ["out.weight", "out.bias"],
    }
    got = names(model, by_depth(model))
    assert got == expected and list(got) == list(expected)
    assert names(model, by_depth(model, ["encoder", model.decoder])) == expected
    # a frozen block and frozen leftovers are left out, not empty groups
    for p in [*model.encoder[0].parameters(), *model.mid_norm.parameters()]:
        p.requires_grad_(False)
    got = names(model, by_depth(model))
    assert list(got) == ["input", "encoder.1", "decoder.0", "decoder.1", "output"]


def test_by_subnetwork_on_a_nam_and_a_mixture_of_experts() -> None:
    torch.manual_seed(0)
    nam = NAM(n_features=3, hidden=4)
    mlp = [f"{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")]
    expected = {
        **{f"features.{j}": [f"features.{j}.{m}" for m in mlp] for j in range(3)},
        "bias": ["bias"],
    }
    assert names(nam, by_subnetwork(nam, "features", rest="bias")) == expected
    assert names(nam, by_subnetwork(nam, nam.features, rest="bias")) == expected
    with pytest.raises(ValueError, match=r"inside the ModuleList 'features'"):
        find_head(nam)

    moe = MixtureOfExperts(d_in=2, d_out=2, n_experts=3, hidden=4)
    two = [f"{i}.{k}" for i in (0, 2) for k in ("weight", "bias")]
    got = names(moe, by_subnetwork(moe, "experts", rest="gate"))
    assert got == {
        **{f"experts.{e}": [f"experts.{e}.{m}" for m in two] for e in range(3)},
        "gate": [f"gate.{m}" for m in two],
    }
    assert list(got)[-1] == "gate"


def test_by_lora_on_hidlr_lora_linear_leaves_the_frozen_base_out() -> None:
    torch.manual_seed(0)
    model = LoRALinear(nn.Linear(6, 5), rank=2)
    assert names(model, by_lora(model)) == {"lora_A": ["lora_A"], "lora_B": ["lora_B"]}
    wrapped = nn.Sequential(model, nn.Linear(5, 2))
    assert names(wrapped, by_lora(wrapped)) == {
        "lora_A": ["0.lora_A"],
        "lora_B": ["0.lora_B"],
        "head": ["1.weight", "1.bias"],
    }


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.ff = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.ff(torch.relu(self.q(x))))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


@pytest.mark.integration
def test_peft_lora_model_groups() -> None:
    peft = pytest.importorskip("peft", reason="optional package 'peft' is not installed")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["q"], modules_to_save=["head"])
    model = peft.get_peft_model(Tiny(), config)
    pre = "base_model.model."
    lora_a = [f"{pre}blocks.{i}.q.lora_A.default.weight" for i in range(2)]
    lora_b = [f"{pre}blocks.{i}.q.lora_B.default.weight" for i in range(2)]
    head = [f"{pre}head.modules_to_save.default.{k}" for k in ("weight", "bias")]
    assert names(model, by_lora(model)) == {"lora_A": lora_a, "lora_B": lora_b, "head": head}
    assert find_head(model) == f"{pre}head"
    lora = sorted([*lora_a, *lora_b])
    assert names(model, by_role(model, "head")) == {"head": head, "rest": lora}
    assert names(model, by_role(model, "head", head="head")) == {"head": head, "rest": lora}
    assert names(model, by_depth(model)) == {
        f"{pre}blocks.0": [lora_a[0], lora_b[0]],
        f"{pre}blocks.1": [lora_a[1], lora_b[1]],
        "output": head,
    }
    # the frozen originals (base layers, original head, norms) are in no group
    grouped = {id(p) for g in by_lora(model) for p in g["params"]}
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert f"{pre}head.original_module.weight" in frozen
    assert not grouped & {id(p) for p in model.parameters() if not p.requires_grad}
    with pytest.raises(
        ValueError, match=r"group 'norm' is empty: no trainable parameter has this role"
    ):
        by_role(model)


@pytest.mark.integration
def test_transformers_heads_are_found() -> None:
    transformers = pytest.importorskip("transformers", reason="'transformers' is not installed")
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            num_hidden_layers=2,
            hidden_size=8,
            num_attention_heads=2,
            intermediate_size=16,
            vocab_size=11,
            max_position_embeddings=16,
            num_labels=3,
        )
    )
    assert find_head(bert) == "classifier"
    depth = names(bert, by_depth(bert))
    assert list(depth) == ["input", "bert.encoder.layer.0", "bert.encoder.layer.1", "output"]
    assert depth["output"] == [
        "bert.pooler.dense.weight",
        "bert.pooler.dense.bias",
        "classifier.weight",
        "classifier.bias",
    ]
    config = transformers.GPT2Config(
        n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    gpt2 = transformers.GPT2LMHeadModel(config)
    assert find_head(gpt2) == "lm_head"
    # lm_head is tied to the input embedding: the shared tensor is the head, under its first name
    assert names(gpt2, by_role(gpt2, "head"))["head"] == ["transformer.wte.weight"]
    # and the head may be named by its second name too
    by_name = names(gpt2, by_role(gpt2, "head", head="lm_head.weight"))
    assert by_name["head"] == ["transformer.wte.weight"]


# -- the shared guarantees ---------------------------------------------------------------------


def _nam() -> NAM:
    torch.manual_seed(0)
    return NAM(3, hidden=4)


def _moe() -> MixtureOfExperts:
    torch.manual_seed(0)
    return MixtureOfExperts(2, 2, n_experts=3, hidden=4)


def _frozen_embedding() -> TokenTransformer:
    model = transformer()
    model.embed.weight.requires_grad_(False)
    model.encoder.layers[1].norm2.bias.requires_grad_(False)
    return model


def _split_head() -> SmallCNN:
    torch.manual_seed(0)
    model = SmallCNN(n_classes=5, channels=4)
    split_output_units(model, "head")
    return model


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], Groups]]] = {
    "role-transformer": (transformer, by_role),
    "role-frozen": (_frozen_embedding, by_role),
    "depth-transformer": (transformer, by_depth),
    "depth-frozen": (_frozen_embedding, by_depth),
    "depth-cnn": (lambda: SmallCNN(3, 4), lambda m: by_depth(m, "body")),
    "role-cnn": (lambda: SmallCNN(3, 4), by_role),
    "subnetwork-nam": (_nam, lambda m: by_subnetwork(m, "features")),
    "subnetwork-moe": (_moe, lambda m: by_subnetwork(m, "experts", rest="gate")),
    "depth-moe": (_moe, by_depth),
    "lora": (lambda: LoRALinear(nn.Linear(6, 5), rank=2), by_lora),
    "patterns": (transformer, lambda m: by_patterns(m, {"attn": "self_attn", "ffn": r"linear\d"})),
    "units": (_split_head, lambda m: by_output_unit(m, "head")),
    "units-role": (_split_head, by_role),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_trainable_parameter_is_in_exactly_one_group_in_a_fixed_order(case: str) -> None:
    build, group = CASES[case]
    model = build()
    groups = group(model)
    got = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(got) == len(set(got)) and set(got) == set(trainable)
    assert all(g["params"] and isinstance(g["name"], str) for g in groups)
    assert len({g["name"] for g in groups}) == len(groups)
    # within a group, model.named_parameters() order
    position = {id(p): i for i, p in enumerate(model.parameters())}
    assert all(
        [position[id(p)] for p in g["params"]] == sorted(position[id(p)] for p in g["params"])
        for g in groups
    )
    again = group(model)
    assert [(g["name"], [id(p) for p in g["params"]]) for g in again] == [
        (g["name"], [id(p) for p in g["params"]]) for g in groups
    ]
    check_groups(model, groups)
    torch.optim.SGD(groups, lr=0.1)  # ordinary torch param groups


def test_frozen_parameters_are_left_out() -> None:
    model = _frozen_embedding()
    depth = names(model, by_depth(model))
    assert depth["input"] == ["pos"]
    assert "encoder.layers.1.norm2.bias" not in depth["encoder.layers.1"]
    role = names(model, by_role(model))
    assert "embed.weight" not in role["rest"] and "encoder.layers.1.norm2.bias" not in role["norm"]
    model.pos.requires_grad_(False)
    assert "input" not in names(model, by_depth(model))  # a leftover with nothing is dropped


# -- by pattern and the errors ------------------------------------------------------------------


def test_by_patterns_regex_and_predicate() -> None:
    model = transformer(layers=1)
    got = names(
        model,
        by_patterns(model, {"attn": r"self_attn", "ffn": re.compile(r"linear\d")}, rest="other"),
    )
    assert got == {
        "attn": layer(0, *LAYER_PARAMS[:4]),
        "ffn": layer(0, *LAYER_PARAMS[4:8]),
        "other": [
            "pos",
            "embed.weight",
            *layer(0, *LAYER_NORMS),
            "norm.weight",
            "norm.bias",
            "head.weight",
            "head.bias",
        ],
    }
    split = names(model, by_patterns(model, {"matrices": lambda n, p: p.ndim >= 2}, rest="vectors"))
    assert split["matrices"] == ["pos", "embed.weight", *layer(0, *LAYER_MATRICES), "head.weight"]


def test_by_patterns_overlap_names_the_parameters_and_both_groups() -> None:
    model = transformer(layers=1)
    with pytest.raises(
        ValueError,
        match=r"more than one group: 'encoder\.layers\.0\.norm1\.weight' \(in 'weights' and 'no",
    ):
        by_patterns(model, {"weights": r"weight$", "norms": r"norm"})


def _tt() -> TokenTransformer:
    return transformer(layers=1)


ERRORS: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "empty pattern",
        lambda: by_patterns(_tt(), {"x": "nomatch"}),
        ValueError,
        r"group 'x' is empty: its pattern matches no trainable parameter",
    ),
    (
        "rest None",
        lambda: by_patterns(_tt(), {"a": "self_attn"}, rest=None),
        ValueError,
        r"matched by no pattern \(rest=None\): 'pos', 'embed\.weight'",
    ),
    (
        "bad regex",
        lambda: by_patterns(_tt(), {"a": "("}),
        ValueError,
        r"patterns\['a'\] must be a valid regular expression",
    ),
    (
        "bad pattern",
        lambda: by_patterns(_tt(), {"a": 3}),
        TypeError,
        r"patterns\['a'\] must be a regular expression or a callable, got 3",
    ),
    (
        "no patterns",
        lambda: by_patterns(_tt(), {}),
        TypeError,
        r"patterns must be a non-empty mapping",
    ),
    (
        "rest taken",
        lambda: by_patterns(_tt(), {"a": "pos"}, rest="a"),
        ValueError,
        r"rest must be a non-empty group name other than 'a', got 'a'",
    ),
    (
        "unknown head",
        lambda: by_role(_tt(), head="hed"),
        ValueError,
        r"head must be the name of a submodule of the model, got 'hed' \(did you mean 'head'",
    ),
    (
        "foreign head",
        lambda: by_role(_tt(), head=nn.Linear(2, 2)),
        ValueError,
        r"head must be a submodule of the model or its name, got 'Linear'",
    ),
    (
        "head unused",
        lambda: by_role(_tt(), "bias", head="head"),
        ValueError,
        r"head must be None unless 'head' is one of the roles",
    ),
    (
        "unknown role",
        lambda: by_role(_tt(), ("head", "embedding")),
        ValueError,
        r"roles must be a role or a sequence of distinct roles among 'head', 'norm', 'bias'",
    ),
    ("repeated role", lambda: by_role(_tt(), ("bias", "bias")), ValueError, r"roles must be"),
    (
        "no norm",
        lambda: by_role(MLP([2, 3, 1]), "norm"),
        ValueError,
        r"group 'norm' is empty: no trainable parameter has this role",
    ),
    (
        "frozen head",
        lambda: by_role(_frozen(SmallCNN(2, 4), "head"), "head", head="head"),
        ValueError,
        r"group 'head' is empty",
    ),
    (
        "no head",
        lambda: find_head(nn.Sequential(nn.Conv2d(1, 2, 3))),
        ValueError,
        r"no trainable nn\.Linear",
    ),
    (
        "not a model",
        lambda: by_role([nn.Parameter(torch.zeros(1))]),
        TypeError,
        r"model must be a torch\.nn\.Module, got 'list'",
    ),
    (
        "no trainable",
        lambda: by_depth(_frozen(MLP([2, 3, 1]), "")),
        ValueError,
        r"model must have at least one trainable parameter, got none",
    ),
    (
        "unknown blocks",
        lambda: by_depth(_tt(), "encoder.layer"),
        ValueError,
        r"blocks must be the name of a submodule.*did you mean 'encoder\.layers'",
    ),
    (
        "nested blocks",
        lambda: by_depth(_tt(), ["encoder", "encoder.layers"]),
        ValueError,
        r"blocks must be containers that do not contain one another",
    ),
    (
        "leaf container",
        lambda: by_subnetwork(_tt(), "head"),
        ValueError,
        r"container must be a module with children holding trainable parameters, got 'head'",
    ),
    (
        "no lora",
        lambda: by_lora(_tt()),
        ValueError,
        r"group 'lora_A' is empty: no trainable parameter has a 'lora_A' part",
    ),
    (
        "units unsplit",
        lambda: by_output_unit(_tt(), "head"),
        TypeError,
        r"call split_output_units\(model, 'head'\) first",
    ),
]


def _frozen(model: nn.Module, prefix: str) -> nn.Module:
    for n, p in model.named_parameters():
        if n.startswith(prefix):
            p.requires_grad_(False)
    return model


@pytest.mark.parametrize("call, exc, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_say_what_is_wrong(
    call: Callable[[], Any], exc: type[Exception], message: str
) -> None:
    with pytest.raises(exc, match=message):
        call()


def test_check_groups_finds_overlaps_gaps_and_strangers() -> None:
    model = transformer(layers=1)
    ps = dict(model.named_parameters())
    rest = [p for n, p in ps.items() if n not in ("pos", "head.weight")]
    check_groups(model, [{"params": [ps["pos"]]}, {"params": [ps["head.weight"], *rest]}])
    with pytest.raises(ValueError, match=r"'pos' \(in 'group0' and 'b'\)"):
        check_groups(model, [{"params": [ps["pos"]]}, {"params": list(ps.values()), "name": "b"}])
    with pytest.raises(ValueError, match=r"trainable parameters in no group: 'head\.weight'"):
        check_groups(model, [{"params": [ps["pos"]]}, {"params": rest}])
    with pytest.raises(ValueError, match=r"not a parameter of the model"):
        check_groups(model, [{"params": [torch.zeros(2, requires_grad=True), *ps.values()]}])
    ps["pos"].requires_grad_(False)
    with pytest.raises(ValueError, match=r"group 'frozen' is empty"):
        check_groups(
            model,
            [{"params": [ps["pos"]], "name": "frozen"}, {"params": rest + [ps["head.weight"]]}],
        )


# -- one group per output unit ------------------------------------------------------------------


class Celeb(nn.Module):
    """A trunk and one linear layer of 40 binary attribute logits (CelebA-shaped, smaller)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16, dtype=dtype), nn.Tanh())
        self.head = nn.Linear(16, 40, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_output_units_computes_exactly_the_same_function(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = Celeb(dtype)
    x = torch.randn(32, 6, dtype=dtype)
    before = model(x)
    weight, bias = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    state = torch.random.get_rng_state()
    new = split_output_units(model, "head")
    assert torch.equal(torch.random.get_rng_state(), state)  # no random numbers drawn
    assert model.head is new and isinstance(new, UnitSplitLinear)
    assert torch.equal(model(x), before)
    assert torch.equal(new.weight, weight) and torch.equal(new.bias, bias)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n.startswith("head.")}
    assert shapes["head.unit0_weight"] == (1, 16) and shapes["head.unit39_bias"] == (1,)
    assert len(shapes) == 80 and all(p.dtype == dtype for p in model.parameters())
    groups = by_output_unit(model, "head", rest="trunk")
    got = names(model, groups)
    assert list(got) == [*(f"head[{i}]" for i in range(40)), "trunk"]
    assert got["head[7]"] == ["head.unit7_weight", "head.unit7_bias"]
    assert got["trunk"] == ["trunk.0.weight", "trunk.0.bias"]
    # the unit split also shows up in by_role: weights are head, and so are unit biases
    assert len(names(model, by_role(model, ("head", "bias")))["head"]) == 80


def test_split_model_trains_like_the_plain_model_and_each_unit_has_its_own_rate() -> None:
    torch.manual_seed(0)
    plain = Celeb()
    split = copy.deepcopy(plain)
    split_output_units(split, "head")
    x, y = torch.randn(64, 6), torch.randint(0, 2, (64, 40)).float()

    def train(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
            opt.step()

    train(plain, torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9))
    train(split, torch.optim.SGD(by_output_unit(split, "head"), lr=0.5, momentum=0.9))
    plain_state, split_state = plain.state_dict(), split.state_dict()
    assert list(plain_state) == list(split_state)
    assert all(torch.equal(plain_state[k], split_state[k]) for k in plain_state)

    frozen_unit = copy.deepcopy(split)
    start = frozen_unit.head.weight.detach().clone()
    groups = by_output_unit(frozen_unit, "head")
    for g in groups:
        g["lr"] = 0.0 if g["name"] == "head[3]" else 0.5
    train(frozen_unit, torch.optim.SGD(groups))
    moved = (frozen_unit.head.weight.detach() != start).any(dim=1)
    assert not moved[3] and moved[torch.arange(40) != 3].all()


def test_split_state_dict_round_trips_with_the_plain_linear() -> None:
    torch.manual_seed(0)
    plain = Celeb()
    x = torch.randn(8, 6)
    split = copy.deepcopy(plain)
    split_output_units(split, "head")
    assert {k: v.shape for k, v in split.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    # a checkpoint of the plain model loads into the split one ...
    with torch.no_grad():
        plain.head.weight.mul_(2.0)
        plain.head.bias.add_(1.0)
    split.load_state_dict(plain.state_dict())
    assert torch.equal(split(x), plain(x))
    # ... and back
    with torch.no_grad():
        split.head.unit5_weight.fill_(0.25)
    fresh = Celeb()
    fresh.load_state_dict(split.state_dict())
    assert torch.equal(fresh(x), split(x)) and (fresh.head.weight[5] == 0.25).all()
    # assign=True replaces the unit parameters by slices of the checkpoint's tensors
    checkpoint = fresh.state_dict()
    split.load_state_dict(checkpoint, assign=True)
    assert split.head.unit2_weight.data_ptr() == checkpoint["head.weight"][2:3].data_ptr()
    assert torch.equal(split(x), fresh(x))
    # and the usual strictness
    bad = dict(checkpoint, **{"head.weight": torch.zeros(39, 16)})
    with pytest.raises(RuntimeError, match=r"size mismatch for head\.weight"):
        split.load_state_dict(bad)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "head\.bias"'):
        split.load_state_dict({k: v for k, v in checkpoint.items() if k != "head.bias"})
    with pytest.raises(
        RuntimeError, match=r'Unexpected key\(s\) in state_dict: "head\.unit0_weight"'
    ):
        split.load_state_dict(dict(checkpoint, **{"head.unit0_weight": torch.zeros(1, 16)}))
    result = split.load_state_dict(
        {k: v for k, v in checkpoint.items() if k != "head.bias"}, strict=False
    )
    assert result.missing_keys == ["head.bias"]


def test_merge_output_units_gives_back_a_plain_linear() -> None:
    torch.manual_seed(0)
    model = Celeb()
    x = torch.randn(8, 6)
    split_output_units(model, model.head)
    with torch.no_grad():
        model.head.unit1_bias.fill_(3.0)
    out = model(x)
    state = torch.random.get_rng_state()
    merged = merge_output_units(model, "head")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert type(model.head) is nn.Linear and model.head is merged
    assert torch.equal(model(x), out) and merged.bias[1] == 3.0


def test_split_output_units_refuses_what_it_cannot_split() -> None:
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(
        ValueError, match=r"cannot split '1': its parameters are also registered as 0\.weight"
    ):
        split_output_units(tied, "1")
    with pytest.raises(
        TypeError, match=r"module must be an nn\.Linear, got 'trunk \(Sequential\)'"
    ):
        split_output_units(Celeb(), "trunk")
    with pytest.raises(
        ValueError, match=r"module must be a submodule of the model, not the model itself"
    ):
        split_output_units(nn.Sequential(nn.Linear(2, 2)), "")
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)  # one layer registered twice
    x = torch.randn(2, 3)
    out = model(x)
    split_output_units(model, "0")
    assert model[0] is model[2] and isinstance(model[2], UnitSplitLinear)
    assert torch.equal(model(x), out)


# -- summaries ------------------------------------------------------------------------------


def test_summary_records_and_table() -> None:
    model = transformer(layers=1)
    model.embed.weight.requires_grad_(False)  # 10 x 8 = 80 frozen elements
    groups = by_role(model, "head")
    summary = summarize_groups(groups, model)
    assert summary[0] == GroupSummary("head", 2, 8 * 3 + 3, ("head.weight", "head.bias"))
    rest_elements = sum(
        p.numel()
        for n, p in model.named_parameters()
        if p.requires_grad and not n.startswith("head.")
    )
    assert (
        summary[1].name == "rest"
        and summary[1].elements == rest_elements
        and summary[1].tensors == 15
    )
    table = format_groups(groups, model, max_names=2)
    lines = table.splitlines()
    assert lines[0].split() == ["group", "tensors", "elements", "parameters"]
    assert lines[1].split() == ["head", "2", "27", "head.weight,", "head.bias"]
    assert lines[2].split()[:5] == [
        "rest",
        "15",
        f"{rest_elements:,}",
        "pos,",
        "encoder.layers.0.self_attn.in_proj_weight,",
    ]
    assert lines[2].endswith("... (+13)")
    assert lines[3].split() == ["total", "17", f"{27 + rest_elements:,}"]
    assert lines[4].split() == ["frozen", "(left", "out)", "1", "80"]
    # without a model: no names; an optimizer's groups work too
    opt = torch.optim.SGD(groups, lr=0.1)
    assert format_groups(opt).splitlines()[1].split() == ["head", "2", "27"]
    # a grouping that misses a trainable parameter says so
    assert "trainable, in no group" in format_groups(groups[:1], model)


def test_groups_drive_hidlr_one_rate_per_group() -> None:
    import hidlr

    torch.manual_seed(0)
    model = MLP([4, 8, 8, 3])  # linear layers only: norm and conv kernels are slow on some CPUs
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    groups = by_role(model, ("head", "bias"))
    assert names(model, groups) == {
        "head": ["4.weight", "4.bias"],
        "bias": ["0.bias", "2.bias"],
        "rest": ["0.weight", "2.weight"],
    }
    opt = hidlr.HiDLR(torch.optim.SGD(groups, lr=0.05), update_every=1)

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    for _ in range(2):
        opt.zero_grad()
        loss().backward()
        opt.step(loss)
    assert [g["name"] for g in opt.param_groups] == ["head", "bias", "rest"]
    assert len(opt.lrs) == 3 and len(opt.history[-1].groups) == 3


# -- found by review ------------------------------------------------------------------------------


def _three_layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


def test_groups_given_as_generators_survive_the_checks() -> None:
    model = _three_layers()
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    check_groups(model, groups)
    table = format_groups(groups, model)
    assert "in no group" not in table and "total                    4" in table
    assert [len(g["params"]) for g in torch.optim.SGD(groups, lr=0.1).param_groups] == [2, 2]


def test_named_parameter_groups_are_accepted() -> None:
    model = _three_layers()
    groups = [
        {"params": list(model[0].named_parameters())},
        {"params": list(model[2].named_parameters())},
    ]
    check_groups(model, groups)  # (before torch's optimizer, which replaces the pairs)
    assert [s.tensors for s in summarize_groups(groups, model)] == [2, 2]
    torch.optim.SGD(groups, lr=0.1)  # torch takes (name, tensor) pairs too


def test_frozen_parameters_inside_a_group_count_once() -> None:
    model = _three_layers()
    model[0].requires_grad_(False)
    lines = format_groups(torch.optim.SGD(model.parameters(), lr=0.1), model).splitlines()
    assert lines[1].split()[1:3] == ["4", "30"] and lines[-1].split()[-2:] == ["0", "0"]


def test_by_subnetwork_counts_a_shared_parameter_once() -> None:
    class Tower(nn.Module):
        def __init__(self, emb: nn.Module) -> None:
            super().__init__()
            self.emb, self.out = emb, nn.Linear(4, 1)

    class TwoTowers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            shared = nn.Embedding(10, 4)
            self.towers = nn.ModuleList([Tower(shared), Tower(shared)])

    model = TwoTowers()
    groups = by_subnetwork(model, "towers")
    assert [(g["name"], len(g["params"])) for g in groups] == [("towers.0", 3), ("towers.1", 2)]
    assert groups[0]["params"][0] is model.towers[1].emb.weight


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: by_depth(m, blocks=2), r"^blocks must be .*, got 2$"),
        (
            lambda m: check_groups(m, [{"params": None}]),
            r"^groups\[0\]\['params'\] must be a tensor or an iterable of tensors, got None$",
        ),
        (lambda m: format_groups([{"params": 5}]), r"^groups\[0\]\['params'\] must be .*, got 5$"),
        (lambda m: check_groups(m, [{"params": set(m.parameters())}]), r"a set is not"),
    ],
)
def test_bad_group_arguments_are_named(call: Callable[[nn.Module], Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        call(_three_layers())
