"""Stage `validate_params`: check params.yaml before any other stage runs (and so before DVC
deletes any stage's outputs to rerun it).

Every stage of dvc.yaml depends on this stage's output, so DVC runs it first whenever
params.yaml changed (it tracks the whole file). A bad value or an unknown key, e.g. from
`dvc exp run -S head.lr=fast` or `-S +head.lrr=1`, fails here with the dotted key and the fix,
while every tracked model and metrics file is still in place. Its output holds no param value:
for valid params it is the same file every time, so a valid change reruns only the stages
that read the changed keys.
"""

from pipelines.config import load_params
from pipelines.io import write_json
from stages.common import DATA, cli

PARAMS_VALID = DATA / "params_valid.json"


@cli
def main() -> None:
    load_params("params.yaml")  # types, unknown keys, missing keys: DataError naming the key
    write_json(PARAMS_VALID, {"params.yaml": "valid"})


if __name__ == "__main__":
    main()
