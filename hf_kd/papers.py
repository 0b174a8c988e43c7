"""What a method cites: ``Paper``, and the papers that several parts of hf_kd share.

A loss term or a bridge declares its own paper (``TokenLoss.paper``, a bridge's ``paper``); the model card cites
exactly the declared papers of the parts a run used. The papers below are shared: GKD by the ``jsd`` term and
on-policy data (``lmbda``), MGSR by the ``dac_kl`` and ``span`` terms and SCRG (``scrg_corrections``), DistiLLM by
the skew KL terms, BiLD by the ``bild`` and ``prompt_fkl`` terms.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Paper:
    """A method's paper: the short method name shown on the card, title, arXiv id and BibTeX entry."""

    method: str
    title: str
    arxiv_id: str
    bibtex: str

    @property
    def citation_line(self) -> str:
        return f"{self.method}: {self.title} (arXiv:{self.arxiv_id})"


GKD = Paper(
    "GKD",
    "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
    "2306.13649",
    """@inproceedings{agarwal2024onpolicy,
  title     = {On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes},
  author    = {Agarwal, Rishabh and Vieillard, Nino and Zhou, Yongchao and Stanczyk, Piotr and
               Ramos Garea, Sabela and Geist, Matthieu and Bachem, Olivier},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2306.13649},
  archivePrefix = {arXiv}
}""",
)

MGSR = Paper(
    "MGSR",
    "Multi-Granularity Semantic Revision for Large Language Model Distillation",
    "2407.10068",
    """@inproceedings{liu2026multi,
  title     = {Multi-Granularity Semantic Revision for Large Language Model Distillation},
  author    = {Liu, Xiaoyu and Zhang, Yun and Li, Wei and Huang, Xudong and
               Chen, Hanting and Tang, Yehui and Hu, Jie and Xiong, Zhiwei and Wang, Yunhe},
  booktitle = {Proceedings of the Annual Meeting of the Association for Computational Linguistics (ACL)},
  year      = {2026},
  eprint    = {2407.10068},
  archivePrefix = {arXiv}
}""",
)

DISTILLM = Paper(
    "DistiLLM",
    "DistiLLM: Towards Streamlined Distillation for Large Language Models",
    "2402.03898",
    """@inproceedings{ko2024distillm,
  title     = {{DistiLLM}: Towards Streamlined Distillation for Large Language Models},
  author    = {Ko, Jongwoo and Kim, Sungnyun and Chen, Tianyi and Yun, Se-Young},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning (ICML)},
  year      = {2024},
  eprint    = {2402.03898},
  archivePrefix = {arXiv}
}""",
)
"""Shared by the two skew KL terms (``sfkl``, ``srkl``)."""

BILD = Paper(
    "BiLD",
    "BiLD: Bi-directional Logits Difference Loss for Large Language Model Distillation",
    "2406.13555",
    """@inproceedings{li2025bild,
  title     = {{BiLD}: Bi-directional Logits Difference Loss for Large Language Model Distillation},
  author    = {Li, Minchong and Zhou, Feng and Song, Xiaohui},
  booktitle = {Proceedings of the 31st International Conference on Computational Linguistics (COLING)},
  year      = {2025},
  eprint    = {2406.13555},
  archivePrefix = {arXiv}
}""",
)
"""Shared by the ``bild`` term and ``prompt_fkl`` (the loss BiLD's official trainer adds on prompt positions)."""

__all__ = ["BILD", "DISTILLM", "GKD", "MGSR", "Paper"]
