"""When the wrapper compiles adapters: writes compile and attach them; reads (generate, forward) never do."""

from __future__ import annotations

import pytest
import torch
from _memory_fixtures import HashKeyEncoder
from _model_fixtures import bare_generate, one_thread, shape_image, tiny

from esg_memory.memory import EditMemory
from esg_memory.model import ADAPTER_KIND, Adapter, EditedModel

Q = "what color is the shape?"
Q2 = "which shape is in the picture?"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


class _ReadOnlyAttach(EditMemory):
    """A memory that counts `attach` calls and, once armed, refuses them (as if nothing could be written)."""

    armed = False
    attaches = 0

    def attach(self, *args, **kwargs):
        self.attaches += 1
        if self.armed:
            raise AssertionError("a read attached an adapter")
        return super().attach(*args, **kwargs)


def _reads(em, img, q) -> list:
    """Every read entry point on one in-scope row; returns what they produced."""
    with torch.no_grad():
        out = [em.generate(images=[img], prompts=[q], max_new_tokens=3, do_sample=False)]
        out.append(em.forward(images=[img], prompts=[q]).logits)
        inputs = em.build_inputs([img], [q])
        out.append(em(**inputs, route_images=[img], route_texts=[q]).logits)
    out.append(em.answer(images=[img], prompts=[q], max_new_tokens=3))
    out.append([r.edit_id for r in em.retrieve(images=[img], prompts=[q])])
    return out


def _journal_bytes(d) -> int:
    return sum(f.stat().st_size for f in (d / "journal").glob("*.wal"))


def test_add_revise_and_rollback_attach_their_adapter_before_returning():
    model, proc = tiny("llava")
    mem = _ReadOnlyAttach(HashKeyEncoder(32))
    em = EditedModel.wrap(model, proc, mem)
    img = shape_image((220, 30, 30))
    eid = em.add_edit(img, Q, "purple", tune="never")
    stored = Adapter.from_bytes(mem.attachment(eid, ADAPTER_KIND))
    assert mem.attaches == 1 and (stored.kind, stored.edit_id, stored.version) == ("compiled", eid, 1)
    assert stored.model == em.runtime.fingerprint
    assert torch.equal(stored.token_ids, em.runtime.statement_ids(Q, "purple"))
    v2 = em.revise_edit(eid, answer="teal", tune="never")
    assert v2 == 2 and mem.attaches == 2
    assert torch.equal(Adapter.from_bytes(mem.attachment(eid, ADAPTER_KIND, version=2)).token_ids,
                       em.runtime.statement_ids(Q, "teal"))
    # the rollback copies v1's adapter; it is usable, so nothing more is written
    v3 = em.rollback_edit(eid, 1)
    assert v3 == 3 and mem.attaches == 2
    assert mem.attachment(eid, ADAPTER_KIND, version=3) == mem.attachment(eid, ADAPTER_KIND, version=1)
    # a copied adapter that is unusable (here: made for another statement) is compiled and attached
    mem.attach(eid, ADAPTER_KIND, em.runtime.compile(eid, 2, Q, "purple").to_bytes(), version=2)
    v4 = em.rollback_edit(eid, 2)
    assert mem.attaches == 4  # the test's own attach, then the rollback's
    assert torch.equal(Adapter.from_bytes(mem.attachment(eid, ADAPTER_KIND, version=v4)).token_ids,
                       em.runtime.statement_ids(Q, "teal"))
    # and every read afterwards finds them stored: none of them writes
    mem.armed = True
    _reads(em, img, Q)
    assert mem.attaches == 4


def test_reads_never_attach_even_when_the_adapter_is_missing():
    model, proc = tiny("llava")
    mem = _ReadOnlyAttach(HashKeyEncoder(32))
    em = EditedModel.wrap(model, proc, mem)
    img, other = shape_image((220, 30, 30)), shape_image((30, 30, 220), "tri")
    with_model = em.add_edit(img, Q, "purple", tune="never")
    without = mem.add(image=other, question=Q2, answer="hexagon")  # added to without a model
    assert mem.attachment(without, ADAPTER_KIND) is None
    mem.armed = True
    before = mem.attaches
    first = _reads(em, other, Q2)
    assert first[-1] == [without]  # in scope: its adapter was needed, and compiled here
    assert mem.attaches == before and mem.attachment(without, ADAPTER_KIND) is None
    assert em.adapter(without).kind == "compiled"
    assert _reads(em, img, Q)[-1] == [with_model]
    # the adapter compiled at read time is exactly the one a writer would have stored
    again = _reads(em, other, Q2)
    assert all(torch.equal(a, b) for a, b in zip(first[:3], again[:3], strict=True))
    mem.armed = False
    em.adapter(without)  # still compiled only in the cache
    EditedModel.wrap(model, proc, mem)  # a load that can write stores it
    assert mem.attachment(without, ADAPTER_KIND) is not None
    with torch.no_grad():
        stored = em.forward(images=[other], prompts=[Q2]).logits
    assert torch.equal(stored, first[1])


def test_a_durable_memory_journals_nothing_across_reads(tmp_path):
    model, proc = tiny("llava")
    d = tmp_path / "durable"
    em = EditedModel.wrap(model, proc, EditMemory.open(d, HashKeyEncoder(32)))
    try:
        img, other = shape_image((220, 30, 30)), shape_image((30, 200, 30), "rect")
        em.add_edit(img, Q, "purple", tune="never")
        em.memory.add(image=other, question=Q2, answer="square")  # journaled without an adapter
        size = _journal_bytes(d)
        assert size > 0
        for _ in range(2):
            _reads(em, img, Q)
            _reads(em, other, Q2)
        assert _journal_bytes(d) == size
    finally:
        em.memory.close()


def test_a_memory_opened_read_only_serves_edits_it_has_no_adapter_for(tmp_path):
    model, proc = tiny("llava")
    img = shape_image((220, 30, 30))
    mem = EditMemory(HashKeyEncoder(32))
    eid = mem.add(image=img, question=Q, answer="purple")  # saved without any adapter
    mem.save(tmp_path / "plain")
    ro = EditMemory.open(tmp_path / "plain", HashKeyEncoder(32), readonly=True)
    em = EditedModel.wrap(model, proc, ro)  # the load cannot attach; the reads compile instead
    assert ro.attachment(eid, ADAPTER_KIND) is None
    inputs, _ = bare_generate(model, proc, [img], [Q], max_new_tokens=1)
    with torch.no_grad():
        bare = model(**inputs).logits
        got = em.forward(images=[img], prompts=[Q]).logits
        em.generate(images=[img], prompts=[Q], max_new_tokens=3, do_sample=False)
    assert em.retrieve(images=[img], prompts=[Q])[0].edit_id == eid
    assert not torch.equal(got, bare)  # the edit was injected
    assert ro.attachment(eid, ADAPTER_KIND) is None
    # the same memory loaded by a wrapper that can write: its adapter is stored at load
    em2 = EditedModel.wrap(model, proc, memory=tmp_path / "plain", encoder=HashKeyEncoder(32))
    assert em2.memory.attachment(eid, ADAPTER_KIND) is not None
    with torch.no_grad():
        assert torch.equal(em2.forward(images=[img], prompts=[Q]).logits, got)
