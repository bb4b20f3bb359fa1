"""
Execute a notebook top to bottom without Jupyter, for the GPU machine, whose image has Python and torch but no
kernel (no IPython, ipykernel or nbclient):

    python bench/run_notebook.py lora_text.ipynb      # rewrites it in place with its outputs

Each code cell runs in one shared namespace, in order, as Jupyter would run it: printed text becomes a stream
output; a last line that is an expression becomes the cell's result (a matplotlib Figure as a PNG, anything else
as its repr); an exception is recorded as an error output and stops the run with exit status 1. Where Jupyter is
installed, `jupyter nbconvert --execute` gives the same outputs.
"""

import ast
import base64
import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path


def result_output(value, count: int) -> dict:
    if hasattr(value, "savefig"):  # a matplotlib Figure
        buf = io.BytesIO()
        value.savefig(buf, format="png")
        return {"output_type": "display_data", "metadata": {},
                "data": {"image/png": base64.b64encode(buf.getvalue()).decode(), "text/plain": ["<Figure>"]}}
    return {"output_type": "execute_result", "execution_count": count, "metadata": {},
            "data": {"text/plain": repr(value).splitlines(keepends=True)}}


def run_cell(source: str, namespace: dict, count: int) -> tuple[list[dict], bool]:
    """(outputs, ok) of one code cell. IPython's line magics (`%matplotlib inline`) are skipped: without a
    kernel, figures are rendered when a cell returns them."""
    source = "".join(line for line in source.splitlines(keepends=True) if not line.lstrip().startswith("%"))
    tree = ast.parse(source)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    stdout, outputs, ok = io.StringIO(), [], True
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stdout):
        try:
            exec(compile(tree, f"<cell {count}>", "exec"), namespace)
            value = eval(compile(ast.Expression(last.value), f"<cell {count}>", "eval"), namespace) if last else None
        except Exception as e:
            ok, value = False, None
            error = {"output_type": "error", "ename": type(e).__name__, "evalue": str(e),
                     "traceback": traceback.format_exc().splitlines()}
    if stdout.getvalue():
        outputs.append({"output_type": "stream", "name": "stdout", "text": stdout.getvalue().splitlines(keepends=True)})
    if not ok:
        outputs.append(error)
    elif value is not None:
        outputs.append(result_output(value, count))
    return outputs, ok


def main(path: Path) -> int:
    nb = json.loads(path.read_text())
    os.chdir(path.resolve().parent)
    sys.path.insert(0, str(path.resolve().parent))
    namespace, count = {"__name__": "__main__"}, 0
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        count += 1
        start = time.perf_counter()
        cell["outputs"], ok = run_cell("".join(cell["source"]), namespace, count)
        cell["execution_count"] = count
        first_line = "".join(cell["source"]).strip().split("\n")[0][:60]
        print(f"cell {count}: {'ok' if ok else 'FAILED'} in {time.perf_counter() - start:.2f} s  ({first_line})", flush=True)
        if not ok:
            print("".join(cell["outputs"][-1]["traceback"][-20:]))
            break
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
