"""The robustness benchmark's task sets, apart from the tasks (which import their models and
data loaders), so that the command line can offer them without importing those."""

__all__ = ["SPLITS"]

# the task sets in the order they were written; each later one was run before any change
# to the defaults that followed it ("real": the first tasks on real data)
SPLITS = (
    "tune",
    "heldout",
    "fresh",
    "unseen",
    "blind",
    "real",
    "blind2",
    "blind3",
    "blind4",
    "blind5",
    "blind6",
    "blind7",
    "blind8",
    "blind9",
    "blind10",
    "blind11",
    "blind12",
    "blind13",
    "blind14",
    "blind15",
)
