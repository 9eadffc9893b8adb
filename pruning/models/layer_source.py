"""Decoder layers one at a time: from a model loaded whole, or built from the checkpoint's shards on demand.

A layer source has ``embed(input_ids)``, ``context(seqlen, i)`` (the keyword arguments decoder layer ``i`` gets:
masks per attention type, rotary embeddings), ``layer(i)`` (a context manager yielding decoder layer ``i``) and
``head(hidden)`` (final norm and LM head: logits). ``ResidentSource`` wraps a loaded model: the fast path when the
model fits. ``ShardSource`` holds an empty (meta) skeleton of the model with only the embeddings, the final norm,
the LM head and the non-persistent buffers (rotary frequencies) materialised; ``layer(i)`` builds decoder layer
``i`` from exactly its tensors in the safetensors shards (converted from the on-disk layout by the family's
adapter) and frees it afterwards. Peak memory is then one decoder layer plus the activations, whatever the depth.

``open_source(..., offload=...)`` picks one: ``never`` (resident), ``always`` (shards), ``auto`` (shards when the
model in the requested dtype, times 2.5, does not fit in the device's free memory: a CUDA device's free memory,
or on the CPU the smaller of MemAvailable and the job's cgroup memory limit).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import get_adapter
from .checkpoint import ModelPathError, _weight_map, load_model, read_config, read_experts, read_tensors, torch_dtype

OFFLOAD_MODES = ("auto", "never", "always")
# auto keeps the model resident when 2.5 x its bytes fit: loading a hub (per-expert) checkpoint holds both layouts
# for a while (bench_memory measured 7.6 GB of peak RSS for a 3.8 GB checkpoint), then activations and the allocator
HEADROOM = 2.5


class ResidentSource:
    """Layers of a model loaded whole (``pruning.models.checkpoint.load_model``)."""

    def __init__(self, model, adapter=None, device="cpu"):
        self.model, self.device = model, device
        self.adapter = adapter if adapter is not None else get_adapter(model.config)
        self.config = model.config
        self._contexts: dict[int, list[dict]] = {}

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed(self.model, input_ids.to(self.device))

    def context(self, seqlen: int, i: int) -> dict:
        """Keyword arguments decoder layer ``i`` gets for ``seqlen``-long sequences (masks, rotary embeddings)."""
        if seqlen not in self._contexts:
            self._contexts[seqlen] = self.adapter.layer_context(self.model, seqlen, self.device)
        return self._contexts[seqlen][i]

    @contextlib.contextmanager
    def layer(self, i: int):
        yield self.adapter.decoder_layers(self.model)[i]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.head(self.model, hidden)


class ShardSource(ResidentSource):
    """Layers built one at a time from a checkpoint's shards; only the embeddings, final norm and LM head stay."""

    def __init__(self, model_dir, dtype="float32", device="cpu", trust_remote_code: bool = False):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.dtype = torch_dtype(dtype)
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        adapter = get_adapter(config)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary frequencies) real
            model = AutoModelForCausalLM.from_config(
                config, dtype=self.dtype, trust_remote_code=trust_remote_code,
                attn_implementation=adapter.attn_implementation, experts_implementation="eager")
        super().__init__(model.eval(), adapter, device)
        self.wmap = _weight_map(self.model_dir)
        layers = adapter.decoder_layers(model)
        names = {id(m): n for n, m in model.named_modules()}
        self.layer_prefix = [f"{names[id(layer)]}." for layer in layers]
        self._load_outer()

    # -- the parts outside the decoder layers --------------------------------------------------------
    def _load_outer(self) -> None:
        model = self.model
        in_layer = tuple(self.layer_prefix)
        state = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(in_layer)}
        tied = set()
        if getattr(model.config, "tie_word_embeddings", False):
            out, inp = model.get_output_embeddings(), model.get_input_embeddings()
            names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
            tied = {n for n, p in model.named_parameters(remove_duplicate=False) if out is not None and p is out.weight}
            tied.discard(names.get(id(inp.weight)))
        wanted = [k for k in state if k not in tied]
        missing = [k for k in wanted if k not in self.wmap]
        if missing:
            raise ModelPathError(f"{self.model_dir}: tensors {missing[:3]} not found in the checkpoint's shards")
        tensors = self._read(wanted)
        model.load_state_dict({k: self._cast(t, state[k]) for k, t in tensors.items()}, strict=False, assign=True)
        if tied:
            model.tie_weights()
        for name, module in model.named_modules():  # non-persistent buffers (rotary inv_freq) follow the device
            if not name.startswith(in_layer) and not (name + ".").startswith(in_layer):
                for bname, buf in list(module.named_buffers(recurse=False)):
                    if buf is not None and buf.device.type != "meta":
                        module._buffers[bname] = buf.to(self.device)

    def _cast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        dtype = like.dtype if like.dtype.is_floating_point and t.dtype.is_floating_point else t.dtype
        return t.to(device=self.device, dtype=dtype)

    def _read(self, keys) -> dict[str, torch.Tensor]:
        return read_tensors(self.model_dir, keys, self.wmap)

    # -- one decoder layer -----------------------------------------------------------------------------
    def layer_tensors(self, i: int, keys: list[str]) -> dict[str, torch.Tensor]:
        """Decoder layer ``i``'s tensors by their names in the layer module, from the shards in whichever layout
        they are stored: the adapter names the checkpoint keys stored under other names (``checkpoint_key_names``:
        the hub's per-expert tensors, which ``read_experts`` stacks, and its block name)."""
        a, prefix = self.adapter, self.layer_prefix[i]
        direct = [k for k in keys if prefix + k in self.wmap]
        out = dict(zip(direct, self._read([prefix + k for k in direct]).values()))
        rest = [k for k in keys if k not in out]
        if not rest:
            return out
        layout = a.checkpoint_layout(i, self.wmap) if a.is_moe_layer(i) else None
        stored = {}  # the model's name -> the checkpoint key, for keys stored under another name
        for key, name in a.checkpoint_key_names(i, layout or "fused").items():
            if key in self.wmap and name.startswith(prefix):
                stored.setdefault(name[len(prefix):], []).append(key)
        experts = None
        for k in rest:
            found = stored.get(k, [])
            if len(found) == 1:
                out[k] = self._read(found)[found[0]]
            elif found:  # one tensor per expert: the fused parameter, stacked expert by expert
                experts = read_experts(self.model_dir, a, i) if experts is None else experts
                name = next(n for n, param in a.param_names.items() if k.endswith(f".{param}"))
                out[k] = a.native(name, {"gate_up": experts.gate_up, "down": experts.down}[name])
            else:
                raise ModelPathError(f"{self.model_dir}: tensor {prefix + k} of decoder layer {i} not found in the shards")
        return out

    @contextlib.contextmanager
    def layer(self, i: int):
        """Decoder layer ``i`` with its tensors loaded, in place in the skeleton (so anything installed on the
        layer's modules, such as observers or skipping routers, persists across uses), emptied again afterwards."""
        layer = self.adapter.decoder_layers(self.model)[i]
        empty = [(m, m._parameters, name, t) for m in layer.modules() for name, t in m._parameters.items()
                 if t is not None and t.device.type == "meta"]
        # buffers too: a persistent one read from the shards (a router's selection bias) may be a view of the
        # shard's memory map, which would keep every page read for this layer resident after it is emptied
        empty += [(m, m._buffers, name, t) for m in layer.modules() for name, t in m._buffers.items() if t is not None]
        state = layer.state_dict(keep_vars=True)
        tensors = self.layer_tensors(i, list(state))
        layer.load_state_dict({k: self._cast(t, state[k]) for k, t in tensors.items()}, strict=True, assign=True)
        for m in layer.modules():  # non-persistent buffers follow the device
            for bname, buf in list(m._buffers.items()):
                if buf is not None and buf.device != torch.device(self.device):
                    m._buffers[bname] = buf.to(self.device)
        try:
            yield layer
        finally:
            for m, store, name, t in empty:  # back to meta, whatever the job did to the layer (e.g. dropped experts)
                store[name] = t


# -- choosing a source ------------------------------------------------------------------------------
def model_bytes(model_dir, dtype="float32") -> int:
    """Bytes the model's tensors take with floating-point ones in ``dtype`` (from the shards' headers; nothing is read)."""
    from ..safetensors_io import read_header

    itemsize = torch.empty(0, dtype=torch_dtype(dtype)).element_size()
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for t in read_header(f)[1].values():
            total += t.numel * (itemsize if t.torch_dtype.is_floating_point else t.torch_dtype.itemsize)
    return total


def _cgroup_limit() -> int | None:
    """The tightest memory limit over this process's cgroup and its ancestors (cgroup v2 or v1), if any."""
    limits = []
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0":
            base, name = Path("/sys/fs/cgroup"), "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        else:
            continue
        p = base / path.lstrip("/")
        while True:
            with contextlib.suppress(OSError, ValueError):
                v = (p / name).read_text().strip()
                if v != "max" and int(v) < 1 << 60:
                    limits.append(int(v))
            if p == base or base not in p.parents:
                break
            p = p.parent
    return min(limits) if limits else None


def free_bytes(device="cpu") -> int:
    """Memory the job can still use on ``device``: a CUDA device's free memory; on the CPU the smaller of
    MemAvailable and the cgroup limit less this process's resident memory."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    avail = 1 << 62
    with contextlib.suppress(OSError, StopIteration, ValueError):
        avail = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))) * 1024
    limit = _cgroup_limit()
    if limit is not None:
        import os

        rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        avail = min(avail, max(limit - rss, 0))
    return avail


def should_offload(model_dir, dtype="float32", device="cpu", offload="auto") -> bool:
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"model.offload: {offload!r} is not one of {', '.join(OFFLOAD_MODES)}")
    if offload != "auto":
        return offload == "always"
    return model_bytes(model_dir, dtype) * HEADROOM > free_bytes(device)


def open_source(model_dir, dtype="float32", device="cpu", offload="auto", trust_remote_code: bool = False):
    """A layer source over ``model_dir``: resident when it fits (or ``offload: never``), else from the shards."""
    read_config(Path(model_dir))
    if should_offload(model_dir, dtype, device, offload):
        return ShardSource(model_dir, dtype, device, trust_remote_code)
    model = load_model(model_dir, dtype, device, trust_remote_code)
    return ResidentSource(model, get_adapter(model.config), device)


def load_placed(model_dir, dtype="float32", devices=("cpu",), offload="auto", offload_folder=None,
                trust_remote_code: bool = False):
    """The whole model for evaluators that need one (lm-eval): on ``devices[0]`` when it fits (or ``offload: never``),
    else through accelerate's big-model inference: a device map over the claimed GPUs, then the CPU, then the disk
    (``offload_folder``), each layer's weights brought to where it runs during the forward. The CPU's share is a
    third of its free memory, and under ``offload: always`` at most half the model, so that part of it really
    lives on disk."""
    devices = list(devices)
    if not should_offload(model_dir, dtype, devices[0], offload):
        return load_model(model_dir, dtype, devices[0], trust_remote_code)
    size = model_bytes(model_dir, dtype)
    max_memory = {}
    for d in devices:
        if str(d).startswith("cuda"):
            max_memory[torch.device(d).index] = int(free_bytes(d) * 0.85)
    cpu = free_bytes("cpu") // 3
    max_memory["cpu"] = int(min(cpu, size // 2) if offload == "always" else cpu)
    if offload_folder is None:
        raise ValueError("offloading to disk needs an offload_folder")
    Path(offload_folder).mkdir(parents=True, exist_ok=True)
    return load_model(model_dir, dtype, devices[0], trust_remote_code, device_map="auto", max_memory=max_memory,
                      offload_folder=str(offload_folder))
