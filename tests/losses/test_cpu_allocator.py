"""The engine's glibc malloc settings: chunk-sized temporaries freed and allocated again reuse their pages."""

import os
import subprocess
import sys
import textwrap

import pytest

from hf_kd.losses.core import DEFAULT_CHUNK_ELEMENTS

DEFAULT_CHUNK_BYTES = DEFAULT_CHUNK_ELEMENTS * 4

SCRIPT = textwrap.dedent(
    """
    import resource, torch
    from hf_kd.losses.cpu_allocator import tune_for_chunks
    from hf_kd.losses.core import DEFAULT_CHUNK_ELEMENTS
    applied = tune_for_chunks()

    def chunk():  # a dozen chunk temporaries, written, then freed together (as at the end of an engine chunk)
        temps = [torch.empty(DEFAULT_CHUNK_ELEMENTS).fill_(1.0) for _ in range(12)]
        del temps

    chunk()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    chunk()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _second_chunk_faults(tune: str) -> tuple[bool, int]:
    env = dict(os.environ, HF_KD_TUNE_MALLOC=tune, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_tuned_malloc_reuses_chunk_pages_and_can_be_switched_off():
    applied, tuned = _second_chunk_faults("1")
    skipped, default = _second_chunk_faults("0")
    assert applied and not skipped
    pages = 12 * DEFAULT_CHUNK_BYTES // os.sysconf("SC_PAGE_SIZE")
    assert tuned < 0.25 * pages  # the second chunk reuses (nearly all) the pages the first one mapped
    assert default > 0.5 * pages  # glibc's defaults return them to the kernel and fault them in again


def test_the_engine_leaves_malloc_alone():
    """Process-wide settings are the program's explicit choice (the trainer's, a benchmark's), not a loss call's."""
    script = textwrap.dedent(
        """
        import torch
        from hf_kd.losses import build_loss, cpu_allocator
        labels = torch.tensor([[1, 2, -100]])
        build_loss("jsd")(torch.randn(1, 3, 8, requires_grad=True), torch.randn(1, 3, 8), labels).backward()
        print(cpu_allocator._applied)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "None"  # tune_for_chunks was never called


def test_a_trainer_on_cpu_tunes_malloc():
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        from datasets import Dataset
        from tiny import make_args, make_conversations, make_model, make_tokenizer
        from hf_kd import DistillationTrainer
        from hf_kd.losses import cpu_allocator
        import tempfile, pathlib
        tokenizer = make_tokenizer()
        DistillationTrainer(
            model=make_model(len(tokenizer), layers=1), teacher_model=make_model(len(tokenizer), seed=2),
            args=make_args(pathlib.Path(tempfile.mkdtemp())), train_dataset=Dataset.from_list(make_conversations(4)),
            processing_class=tokenizer,
        )
        print(cpu_allocator._applied)
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[-1] == "True"
