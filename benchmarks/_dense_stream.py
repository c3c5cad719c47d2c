"""The dense easy-vqa edit stream of the write-cost benchmarks (``bench_memory_scale``, ``bench_delete``).

With the untrained ``esg-tiny-clip`` every easy-vqa image+question lies at cosine ~0.99 of every
other, so the whole memory is within the neighbour radius: the worst case for neighbour re-fits.
Answers are made distinct, so every neighbour is also a negative. Data: PyPI ``easy-vqa`` (MIT).
"""

from __future__ import annotations

__all__ = ["dense_stream"]


def dense_stream(n: int) -> list[dict]:
    """The first ``n`` easy-vqa training questions as edits (exits if there are fewer)."""
    import easy_vqa

    qs, answers, image_ids = easy_vqa.get_train_questions()
    if n > len(qs):
        raise SystemExit(f"easy-vqa has only {len(qs)} training questions")
    paths = easy_vqa.get_train_image_paths()
    return [
        {"image": paths[image_ids[j]], "question": qs[j], "answer": f"{answers[j]} #{j}"} for j in range(n)
    ]
