"""The grader's worker: runs a submission's functions on the grader's inputs and writes back their outputs as data.

    python -I -S -B worker.py CODE_DIR SITE_PACKAGES IO_DIR

It runs inside the sandbox (`course.sandbox`), the only process that imports the submission: CODE_DIR (the
submission's `common/`, `fm/`, `gm/` over the stubbed package) goes first on `sys.path`, then the read-only
SITE_PACKAGES. IO_DIR/in holds `plan.json` (the checks, in order: an adapter and its arguments) and each check's
inputs (`<i>.safetensors` + `<i>.json`); the worker writes `IO_DIR/out/<i>.safetensors` + `<i>.json` (outputs, or
the error raised) and `IO_DIR/out/<i>.started` before each check, so the grader knows which check a crash or a
timeout hit. Nothing it writes can run code when loaded (safetensors and JSON), and the grader decides every
verdict: a submission can change what this process writes, never what the grader concludes from it.

The grader imports this module too, to compute reference outputs with its own copy of the solution (`run_check`),
so one adapter gives both sides of a comparison. Only the standard library, torch and safetensors: it must run
from a lone file in the sandbox.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

Values = dict[str, Any]  # output or input name -> tensor, or a JSON value
MESSAGE_CHARS = 400  # of an exception's text kept for the report
TENSOR_REF = "$"  # an argument "$Q" is the input tensor Q


# ---------------------------------------------------------------------------------------------- data files
def save_values(values: Values, stem: Path) -> None:
    """Write tensors to `stem`.safetensors and everything else to `stem`.json (with the tensors' names)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in values.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps({"values": plain, "tensors": sorted(tensors)}))


def load_values(stem: Path, max_bytes: int = 256 << 20) -> Values:
    """Read what `save_values` wrote, refusing links and files over `max_bytes` (the worker's files are untrusted)."""
    values: Values = {}
    for suffix in (".json", ".safetensors"):
        path = stem.with_suffix(suffix)
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{path.name} is missing or not a regular file")
        if path.stat().st_size > max_bytes:
            raise ValueError(f"{path.name} is larger than {max_bytes >> 20} MiB")
    meta = json.loads(stem.with_suffix(".json").read_text())
    values.update(meta["values"])
    values.update(load_file(str(stem.with_suffix(".safetensors"))))
    return values


# ---------------------------------------------------------------------------------------------- adapters
def resolve(dotted: str) -> Any:
    """`fm.attention.multi_head_self_attention` or `gm.model.VAE.reparameterize`: import the longest module prefix,
    then follow attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(f"no module for {dotted!r}")


class Recorder(nn.Module):
    """Stands in for a dropout layer: returns its input and keeps it (the attention weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return x


class HalfModel(nn.Module):
    """A denoiser that returns 0.5 x and keeps what it was called with."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self.seen = {"x": x, "t": t, "y": y}
        return 0.5 * x


class BigramLM(nn.Module):
    """The logits at t depend on token t only: (V, V) table rows."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def optimal_eps(diffusion: Any, data_mean: float, data_std: float):
    """E[eps | x_t] for 1-D data x0 ~ N(data_mean, data_std^2): the exact minimiser of the eps-prediction MSE."""

    def model(xt: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        abar = diffusion.alphas_cumprod[t].reshape(-1, 1).double()
        var_t = abar * data_std**2 + 1 - abar
        return ((1 - abar).sqrt() * (xt.double() - abar.sqrt() * data_mean) / var_t).to(xt.dtype)

    return model


def _argument(value: Any, tensors: Values, objects: dict[str, Any]) -> Any:
    """An argument of the plan: "$name" is an input tensor, "@name" an object built for this check, a dict
    {"generator": seed} a seeded torch.Generator; anything else is passed as is."""
    if isinstance(value, str) and value.startswith(TENSOR_REF):
        return tensors[value[1:]]
    if isinstance(value, str) and value.startswith("@"):
        return objects[value[1:]]
    if isinstance(value, dict) and set(value) == {"generator"}:
        return torch.Generator().manual_seed(value["generator"])
    if isinstance(value, dict):
        return {k: _argument(v, tensors, objects) for k, v in value.items()}
    if isinstance(value, list):
        return [_argument(v, tensors, objects) for v in value]
    return value


def _build_objects(spec: dict, tensors: Values, owner: Any) -> dict[str, Any]:
    objects: dict[str, Any] = {}
    for name, (kind, arg) in spec.get("objects", {}).items():
        if kind == "dropout":
            objects[name] = nn.Dropout(arg)
        elif kind == "recorder":
            objects[name] = Recorder()
        elif kind == "half_model":
            objects[name] = HalfModel()
        elif kind == "bigram":
            objects[name] = BigramLM(tensors[arg])
        elif kind == "optimal_eps":
            objects[name] = optimal_eps(owner, *arg)
        elif kind == "gpt2_tokenizer":
            objects[name] = resolve("fm.tokenizer.get_gpt2_tokenizer")()
        else:
            raise ValueError(f"unknown object kind {kind!r}")
    return objects


def flatten(prefix: str, value: Any, out: Values) -> None:
    """Name every tensor or plain value inside a function's result: out, out.0, out.loss, out.prev_sample."""
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach()
        out[f"{prefix}:requires_grad"] = bool(value.requires_grad)
    elif isinstance(value, tuple | list) and any(isinstance(v, torch.Tensor | tuple | list | dict) for v in value):
        for i, item in enumerate(value):
            flatten(f"{prefix}.{i}", item, out)
    elif isinstance(value, dict):
        for key, item in value.items():
            flatten(f"{prefix}.{key}", item, out)
    elif hasattr(value, "__dataclass_fields__") or hasattr(value, "_asdict"):
        fields = value._asdict() if hasattr(value, "_asdict") else {k: getattr(value, k) for k in
                                                                      value.__dataclass_fields__}
        flatten(prefix, dict(fields), out)
    elif value is None or isinstance(value, bool | int | float | str | list | tuple):
        out[prefix] = list(value) if isinstance(value, tuple) else value
    else:
        out[prefix] = f"<{type(value).__name__}>"  # named, so a check can say what came back instead


def call(spec: dict, tensors: Values) -> Values:
    """Call `spec["function"]` (on an instance built with `spec["init"]` when given) with the plan's arguments;
    outputs: the flattened result, the gradients of `spec["grad"]["of"]`.sum() with respect to the listed inputs
    and objects' parameters, and what recorders saw."""
    tensors = dict(tensors)
    grad = spec.get("grad") or {}
    for name in grad.get("inputs", ()):
        tensors[name] = tensors[name].clone().requires_grad_(True)
    function = resolve(spec["function"])
    owner = None
    if "init" in spec:
        cls_name, method = spec["function"].rsplit(".", 1)
        owner = resolve(cls_name)(**spec["init"])
        function = getattr(owner, method)
    objects = _build_objects(spec, tensors, owner)
    args = [_argument(a, tensors, objects) for a in spec.get("args", ())]
    kwargs = {k: _argument(v, tensors, objects) for k, v in spec.get("kwargs", {}).items()}
    if "seed" in spec:
        torch.manual_seed(spec["seed"])
    out: Values = {}
    result = function(*args, **kwargs)
    flatten("out", result, out)
    if grad and isinstance(out.get(grad["of"]), torch.Tensor) and out[f"{grad['of']}:requires_grad"]:
        _root(result, grad["of"]).sum().backward()
        for name in grad.get("inputs", ()):
            out[f"grad.{name}"] = tensors[name].grad if tensors[name].grad is not None else torch.zeros(0)
        for name, obj in objects.items():
            if isinstance(obj, BigramLM):
                out[f"grad.{name}"] = obj.table.grad
    for name, obj in objects.items():
        if isinstance(obj, Recorder | HalfModel) and hasattr(obj, "seen"):
            flatten(f"seen.{name}", obj.seen, out)
    return out


def _root(result: Any, path: str) -> torch.Tensor:
    """The tensor at `path` ("out.0") inside a function's result, with its graph."""
    for key in path.split(".")[1:]:
        result = result[int(key)] if isinstance(result, tuple | list) else result[key]
    return result


def mhsa_cache(spec: dict, tensors: Values) -> Values:
    """MultiHeadSelfAttention: a full pass, a pass with the future changed, and a pass split by its KV cache."""
    torch.manual_seed(spec["seed"])
    attn = resolve("fm.attention.MultiHeadSelfAttention")(**spec["init"]).eval()
    x, split = tensors["x"], spec["split"]
    full, _ = attn(x)
    changed = x.clone()
    changed[:, split:] += 1.0
    first, past = attn(x[:, :split], use_cache=True)
    rest, _ = attn(x[:, split:], layer_past=past)
    return {"full": full.detach(), "changed_prefix": attn(changed)[0][:, :split].detach(),
            "cached": torch.cat([first, rest], dim=1).detach()}


def fit(spec: dict, tensors: Values) -> Values:
    """A few Adam steps on `spec["loss"]`: the loss before and after ("sft": a bigram LM on a batch;
    "hinge": a PatchGAN discriminator separating real from fake images)."""
    torch.manual_seed(spec["seed"])
    if spec["loss"] == "sft":
        model = BigramLM(tensors["table"])
        batch = {k: tensors[k] for k in ("input_ids", "attention_mask", "labels")}
        sft_loss = resolve("fm.sft.sft_loss")

        def loss_fn() -> torch.Tensor:
            return sft_loss(model, batch)[0]
    else:
        model = resolve("gm.model.Discriminator")(1, num_channels=8)
        d_hinge, real, fake = resolve("gm.loss.d_hinge_loss"), tensors["real"], tensors["fake"]

        def loss_fn() -> torch.Tensor:
            return d_hinge(model(real), model(fake))
    opt = torch.optim.Adam(model.parameters(), lr=spec["lr"], betas=tuple(spec.get("betas", (0.9, 0.999))))
    first = loss_fn().item()
    for _ in range(spec["steps"]):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {"first": first, "last": loss_fn().item()}
    if spec["loss"] == "hinge":
        g_hinge = resolve("gm.loss.g_hinge_loss")
        out.update(g_fake=g_hinge(model(fake)).item(), g_real=g_hinge(model(real)).item())
    return out


def vae_modes(spec: dict, tensors: Values) -> Values:
    """A VAE's reconstruction twice in training mode and twice in eval mode."""
    torch.manual_seed(spec["seed"])
    vae = resolve("gm.model.VAE")(1, num_channels=8)
    x, out = tensors["x"], {}
    for mode in ("train", "eval"):
        vae.train(mode == "train")
        with torch.no_grad():
            out[f"{mode}.0"], out[f"{mode}.1"] = vae(x)[0], vae(x)[0]
    return out


def sample(spec: dict, tensors: Values) -> Values:
    """GaussianDiffusion.sample with the exact denoiser of 1-D Gaussian data."""
    diffusion = resolve("gm.diffusion.GaussianDiffusion")(**spec.get("init", {}))
    model = optimal_eps(diffusion, *spec["data"])
    x = diffusion.sample(model, tuple(spec["shape"]), sampler=spec["sampler"], steps=spec.get("steps"),
                         progress=False, generator=torch.Generator().manual_seed(spec["seed"]))
    return {"x": x}


ADAPTERS = {"call": call, "mhsa_cache": mhsa_cache, "fit": fit, "vae_modes": vae_modes, "sample": sample}


def run_check(spec: dict, inputs: Values) -> Values:
    """The outputs of one check: its adapter run on its inputs with whatever `fm`, `gm`, `common` import."""
    return ADAPTERS[spec["adapter"]](spec, inputs)


def describe_error(err: BaseException, code_dir: str | None = None) -> str:
    """`Type: message (file:line)`, the line being the deepest frame in the submission's code."""
    if isinstance(err, SyntaxError) and code_dir and (err.filename or "").startswith(code_dir):
        return f"SyntaxError: {err.msg} ({err.filename[len(code_dir):].lstrip('/')}:{err.lineno})"
    text = f"{type(err).__name__}: {err}".strip()
    if len(text) > MESSAGE_CHARS:
        text = text[: MESSAGE_CHARS - 3] + "..."
    frames = [f for f in traceback.extract_tb(err.__traceback__) if code_dir and f.filename.startswith(code_dir)]
    return f"{text} ({frames[-1].filename[len(code_dir):].lstrip('/')}:{frames[-1].lineno})" if frames else text


def main(code_dir: str, site_packages: str, io_dir: str) -> None:
    inputs, outputs = Path(io_dir) / "in", Path(io_dir) / "out"
    plan = json.loads((inputs / "plan.json").read_text())
    for index, spec in enumerate(plan):
        (outputs / f"{index}.started").touch()
        start = time.process_time()
        try:
            values = run_check(spec, load_values(inputs / str(index)))
            status = {"error": None}
        except BaseException as err:  # noqa: B036 - SystemExit and KeyboardInterrupt from student code too
            values, status = {}, {"error": describe_error(err, code_dir)}
        status["cpu_seconds"] = round(time.process_time() - start, 3)
        try:
            save_values({**values, ":status": json.dumps(status)}, outputs / str(index))
        except Exception as err:  # e.g. a tensor that safetensors cannot store: report it instead
            save_values({":status": json.dumps({"error": f"outputs could not be saved: {describe_error(err)}"})},
                        outputs / str(index))


# How the sandbox starts the worker: `python -I -S -B -c BOOTSTRAP WORKER CODE_DIR SITE_PACKAGES IO_DIR`; the paths
# must be set before this module's imports run, and -I keeps the environment and the user's site out.
BOOTSTRAP = ("import runpy, sys; worker, code, site = sys.argv[1:4]; sys.path[:0] = [code]; sys.path.append(site); "
             "runpy.run_path(worker, run_name='__main__')")

if __name__ == "__main__":
    main(*sys.argv[2:5])
