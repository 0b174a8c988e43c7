"""DSKD-CMA on a real pair: Gemma-3-270m teacher (vocab 262144) -> SmolLM2-135M-Instruct student (vocab 49152).

Slow (loads both models from their PyPI GGUF packages through ``hf_kd.real_models``); run with ``pytest -m slow -s``
to see the step time and peak memory.
"""

import math
import resource
import time
from types import SimpleNamespace

import pytest
import torch

from hf_kd.bridge import DSKDBridge, DualTokenizationCollator
from hf_kd.heads import output_head

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    {
        "messages": [
            {"role": "user", "content": "Give three tips for staying healthy, with one sentence of reasoning each."},
            {
                "role": "assistant",
                "content": "1. Eat a balanced diet: vegetables, fruit, whole grains and lean protein give your body "
                "the vitamins and energy it needs. 2. Exercise regularly: thirty minutes of walking, cycling or "
                "swimming most days strengthens the heart and lifts the mood. 3. Sleep well: seven to nine hours "
                "a night lets the body repair itself and keeps the mind sharp during the day.",
            },
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Explain in a short paragraph why the sky looks blue during the day."},
            {
                "role": "assistant",
                "content": "Sunlight contains every colour of visible light. When it enters the atmosphere, it "
                "meets molecules of nitrogen and oxygen that are much smaller than its wavelength, and these "
                "scatter short wavelengths far more strongly than long ones. Blue light is therefore scattered "
                "across the whole sky and reaches our eyes from every direction, while the sun itself looks "
                "slightly yellow. At sunset the light crosses more air, so the blue is scattered away and red "
                "remains.",
            },
        ]
    },
]


def _load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd.real_models import load_real_model

    try:
        path = load_real_model(name)
    except (ModuleNotFoundError, FileNotFoundError) as err:
        pytest.skip(f"real model {name} not installed: {err}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def test_gemma_to_smollm2_cross_vocabulary_steps():
    teacher, teacher_tok = _load("gemma-3-270m")
    student, student_tok = _load("smollm2-135m-instruct")
    teacher.requires_grad_(False)
    assert teacher.config.get_text_config().vocab_size == 262144 and student.config.vocab_size == 49152

    batch = DualTokenizationCollator(student_tok, teacher_tok, max_length=256)(CONVERSATIONS)
    assert 100 <= batch["input_ids"].shape[1] <= 160 and 100 <= batch["teacher_input_ids"].shape[1] <= 160
    for i, conv in enumerate(CONVERSATIONS):  # both tokenizations carry the same answer
        answer = conv["messages"][-1]["content"]
        for tok, labels in ((student_tok, batch["labels"][i]), (teacher_tok, batch["teacher_labels"][i])):
            assert tok.decode(labels[labels != -100], skip_special_tokens=True).strip() == answer

    # the last hidden state the bridge reads is the one the head turns into the model's logits
    with torch.no_grad():
        out = teacher(
            input_ids=batch["teacher_input_ids"],
            attention_mask=batch["teacher_attention_mask"],
            output_hidden_states=True,
            logits_to_keep=1,
        )
    torch.testing.assert_close(output_head(teacher, frozen=True)(out.hidden_states[-1][:, -1:]), out.logits)

    args = SimpleNamespace(kd_loss="fkl", kd_temperature=None, kd_rate=0.5, loss_chunk_size=None)
    bridge = DSKDBridge(student, teacher, args, teacher_tokenizer=teacher_tok)
    opt = torch.optim.AdamW(
        [{"params": student.parameters(), "lr": 1e-5}, {"params": bridge.parameters(), "lr": 1e-3}]
    )
    losses, times, terms = [], [], []
    for _ in range(3):
        start = time.perf_counter()
        loss, values = bridge.compute_loss(student, teacher, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        terms.append({k: round(float(v), 4) for k, v in values.items()})
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"\nDSKD-CMA gemma-3-270m -> smollm2-135m, batch 2 x {batch['input_ids'].shape[1]} student / "
        f"{batch['teacher_input_ids'].shape[1]} teacher tokens, {torch.get_num_threads()} threads: "
        f"losses {[round(x, 4) for x in losses]}, step seconds {[round(t, 2) for t in times]}, "
        f"peak RSS {peak_rss_gb:.2f} GiB\nterms {terms}"
    )
    assert all(math.isfinite(x) for x in losses)
    assert all(p.grad is None for p in teacher.parameters())
    assert terms[-1]["kd_teacher"] < terms[0]["kd_teacher"]  # the student-to-teacher projection learns
