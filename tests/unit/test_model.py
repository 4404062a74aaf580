import pytest
import torch

from clara_ray.modeling.checkpoint import compressor_fingerprint, load_model, save_model
from clara_ray.modeling.clara import Objective, Role
from clara_ray.modeling.text import tokenize_targets, tokenize_texts
from tests.tiny_model import TEXTS, make_model


def _encode(model, tokenizer, role, texts, max_length=24):
    tokens = tokenize_texts(tokenizer, texts, max_length)
    memory, _ = model.encode(role, tokens.ids, tokens.mask)
    return memory


def test_memory_shape_and_padding_invariance():
    model, tokenizer = make_model(num_memory_tokens=3)
    model.eval()
    alone = _encode(model, tokenizer, Role.COMPRESSOR, [TEXTS[3]])
    batched = _encode(model, tokenizer, Role.COMPRESSOR, [TEXTS[3], TEXTS[1] + " " + TEXTS[0]])
    assert alone.shape == (1, 3, 32)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)


def test_roles_differ_and_copy_adapter_makes_them_equal():
    model, tokenizer = make_model()
    model.eval()
    compressor = _encode(model, tokenizer, Role.COMPRESSOR, TEXTS[:2])
    query = _encode(model, tokenizer, Role.QUERY_REASONER, TEXTS[:2])
    assert not torch.allclose(compressor, query, atol=1e-4)
    model.copy_adapter(Role.COMPRESSOR, Role.QUERY_REASONER)
    assert torch.allclose(compressor, _encode(model, tokenizer, Role.QUERY_REASONER, TEXTS[:2]), atol=1e-6)


def test_retrieval_gains_scale_query_slots_only_and_restart_on_copy():
    model, tokenizer = make_model(num_memory_tokens=2)
    model.eval()
    with torch.no_grad():
        plain = _encode(model, tokenizer, Role.QUERY_REASONER, TEXTS[:2])
        compressor = _encode(model, tokenizer, Role.COMPRESSOR, TEXTS[:2])
        model.retrieval_gain["query_reasoner"].weight.copy_(torch.tensor([[0.0], [2.0]]).log())
        scaled = _encode(model, tokenizer, Role.QUERY_REASONER, TEXTS[:2])
        assert torch.allclose(scaled[:, 0], 0 * plain[:, 0]) and torch.allclose(scaled[:, 1], 2 * plain[:, 1])
        assert torch.equal(compressor, _encode(model, tokenizer, Role.COMPRESSOR, TEXTS[:2]))
        model.copy_adapter(Role.COMPRESSOR, Role.QUERY_REASONER)  # stage 3's start: plain cosine again
        assert torch.equal(model.retrieval_gain["query_reasoner"].weight, torch.zeros(2, 1))
    assert "retrieval_gain.query_reasoner.weight" in model.role_parameters(Role.QUERY_REASONER)
    assert not any(n.startswith("retrieval_gain") for n in model.backbone_parameters())


def test_merged_compressor_encodes_the_same_and_other_roles_still_work():
    model, tokenizer = make_model()
    model.eval()
    with torch.no_grad():
        compressor = _encode(model, tokenizer, Role.COMPRESSOR, TEXTS[:3])
        query = _encode(model, tokenizer, Role.QUERY_REASONER, TEXTS[:3])
        model.merge_for_inference(Role.COMPRESSOR)
        lora_layers = [m for m in model.modules() if hasattr(m, "merged_adapters")]
        assert lora_layers and all(layer.merged_adapters == ["compressor"] for layer in lora_layers)
        assert torch.allclose(compressor, _encode(model, tokenizer, Role.COMPRESSOR, TEXTS[:3]), atol=1e-5)
        assert all(layer.merged for layer in lora_layers)  # encoding did not unmerge it
        # Switching role unmerges first, so the query reasoner is unaffected by the merge.
        assert torch.allclose(query, _encode(model, tokenizer, Role.QUERY_REASONER, TEXTS[:3]), atol=1e-5)
        assert torch.allclose(compressor, _encode(model, tokenizer, Role.COMPRESSOR, TEXTS[:3]), atol=1e-5)


def test_generator_reads_spliced_memory_and_ignores_padding():
    model, tokenizer = make_model()
    model.eval()
    prompt = tokenize_texts(tokenizer, ["Question: Which city?\nAnswer:"], 16)
    target = tokenize_targets(tokenizer, [" Marlow"], 8)
    memory = torch.randn(1, 4, 32)
    loss = model.generator_loss(memory, prompt.ids, prompt.mask, target.ids, target.mask)
    # Memory is at the front of the sequence: other memory, other loss.
    other = model.generator_loss(memory + 1.0, prompt.ids, prompt.mask, target.ids, target.mask)
    assert not torch.isclose(loss, other)
    # Padding between memory and prompt (left-padded prompt) and after the target changes nothing.
    pad = tokenizer.pad_token_id
    padded_ids = torch.cat([torch.full((1, 3), pad), prompt.ids], dim=1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt.mask], dim=1)
    target_ids = torch.cat([target.ids, torch.full((1, 2), pad)], dim=1)
    target_mask = torch.cat([target.mask, torch.zeros(1, 2, dtype=torch.long)], dim=1)
    padded = model.generator_loss(memory, padded_ids, padded_mask, target_ids, target_mask)
    assert torch.isclose(loss, padded, atol=1e-5)
    # Masked memory slots are ignored too.
    extra = torch.cat([memory, torch.randn(1, 2, 32)], dim=1)
    memory_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    masked = model.generator_loss(extra, prompt.ids, prompt.mask, target.ids, target.mask, memory_mask)
    assert torch.isclose(loss, masked, atol=1e-5)


def test_greedy_generation_matches_teacher_forced_argmax():
    model, tokenizer = make_model()
    model.eval()
    prompt = tokenize_texts(tokenizer, ["Question: Which city?\nAnswer:", "Repeat the document:"], 16)
    memory = torch.randn(2, 4, 32)
    generated = model.generate(memory, prompt.ids, prompt.mask, max_new_tokens=3, eos_token_id=-1)
    assert generated.shape == (2, 3)
    # Re-running the whole sequence without a cache gives the same next tokens.
    for step in range(3):
        ids = torch.cat([prompt.ids, generated[:, :step]], dim=1)
        mask = torch.cat([prompt.mask, torch.ones(2, step, dtype=torch.long)], dim=1)
        embeds, full_mask = model._generator_embeddings(memory, ids, mask)
        hidden = model.decoder(inputs_embeds=embeds, attention_mask=full_mask,
                               position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state
        assert torch.equal(model.lm_head(hidden[:, -1]).argmax(-1), generated[:, step])


def test_joint_gradient_reaches_query_reasoner_not_frozen_compressor():
    model, tokenizer = make_model()
    model.set_trainable([Role.QUERY_REASONER, Role.GENERATOR], backbone=False)
    docs = tokenize_texts(tokenizer, TEXTS[:4], 24)
    candidate_memory, _ = model.encode(Role.COMPRESSOR, docs.ids, docs.mask)  # graph kept on purpose
    question = tokenize_texts(tokenizer, ["Which city was Zorvan Kellit born in?"] * 2, 16)
    prompt = tokenize_texts(tokenizer, ["Question: Which city was Zorvan Kellit born in?\nAnswer:"] * 2, 24)
    target = tokenize_targets(tokenizer, [" Marlow"] * 2, 8)
    out = model(
        Objective.JOINT, question_ids=question.ids, question_mask=question.mask,
        candidate_memory=candidate_memory.unsqueeze(0).expand(2, -1, -1, -1),
        prompt_ids=prompt.ids, prompt_mask=prompt.mask, target_ids=target.ids, target_mask=target.mask,
        k=2, temperature=0.02,
    )
    out["loss"].backward()
    query = model.role_parameters(Role.QUERY_REASONER)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in query.items() if "lora_A" in n)
    assert query["memory_tokens.query_reasoner.weight"].grad.abs().sum() > 0
    for params in (model.role_parameters(Role.COMPRESSOR), model.backbone_parameters()):
        assert all(p.grad is None for p in params.values())


def test_save_load_round_trip(tmp_path):
    model, tokenizer = make_model()
    model.eval()
    with torch.no_grad():
        model.retrieval_gain["query_reasoner"].weight.normal_()
    save_model(model, tokenizer, tmp_path / "m", backbone_ref="tiny", save_backbone=True)
    loaded, loaded_tokenizer, manifest = load_model(tmp_path / "m")
    loaded.eval()
    assert manifest["compressor_fingerprint"] == compressor_fingerprint(model) == compressor_fingerprint(loaded)
    for role in (Role.COMPRESSOR, Role.QUERY_REASONER):
        assert torch.allclose(_encode(model, tokenizer, role, TEXTS), _encode(loaded, loaded_tokenizer, role, TEXTS))


def test_model_saved_without_retrieval_gains_loads_with_gain_one(tmp_path):
    from safetensors.torch import load_file, save_file

    model, tokenizer = make_model()
    directory = save_model(model, tokenizer, tmp_path / "m", backbone_ref="tiny", save_backbone=True)
    adapters = load_file(str(directory / "adapters.safetensors"))
    save_file({n: t for n, t in adapters.items() if not n.startswith("retrieval_gain.")}, str(directory / "adapters.safetensors"))
    loaded, _, _ = load_model(directory)
    assert torch.equal(loaded.retrieval_gain["query_reasoner"].weight, torch.zeros(2, 1))


def test_parameter_groups_give_retrieval_gains_their_own_rate():
    from clara_ray.training.engine import parameter_groups

    model, _ = make_model()
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    gain = model.retrieval_gain["query_reasoner"].weight
    rest, gains = parameter_groups(model, 0.05)
    assert gains == {"params": [gain], "lr": 0.05}
    assert {id(p) for p in rest["params"]} == trainable - {id(gain)}
    (single,) = parameter_groups(model, None)
    assert {id(p) for p in single["params"]} == trainable


def test_held_gain_group_does_not_move_while_the_rest_trains():
    from clara_ray.training.engine import hold_last_group, parameter_groups

    model, tokenizer = make_model()
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-3)
    gain = model.retrieval_gain["query_reasoner"].weight
    question = tokenize_texts(tokenizer, TEXTS[:2], 16)
    for held in (True, False):
        optimizer.param_groups[-1]["lr"] = 0.05  # as the schedule sets it after every step
        before = gain.detach().clone()
        lora = next(p for n, p in model.role_parameters(Role.QUERY_REASONER).items() if "lora_B" in n)
        lora_before = lora.detach().clone()
        memory, _ = model.encode(Role.QUERY_REASONER, question.ids, question.mask)
        optimizer.zero_grad()
        (memory[:, 1].sum() - memory[:, 0].sum()).backward()
        if held:
            hold_last_group(optimizer)
        optimizer.step()
        assert not torch.equal(lora, lora_before)
        assert torch.equal(gain, before) == held


def test_parameter_anchor_pulls_trainable_parameters_but_not_gains_back_to_their_start():
    from clara_ray.training.engine import ParameterAnchor

    model, _ = make_model()
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    assert ParameterAnchor(model, 0.0).params == []
    assert ParameterAnchor(model, 0.0).penalty().item() == 0.0
    anchor = ParameterAnchor(model, 1e-3)
    gain = model.retrieval_gain["query_reasoner"].weight
    trainable = [p for p in model.parameters() if p.requires_grad and p is not gain]
    assert [id(p) for p in anchor.params] == [id(p) for p in trainable]
    assert anchor.penalty().item() == 0.0
    moved = model.memory_tokens["query_reasoner"].weight
    frozen = next(p for n, p in model.role_parameters(Role.COMPRESSOR).items() if "lora_A" in n)
    with torch.no_grad():
        moved.add_(0.5)
        gain.add_(1.0)
    penalty = anchor.penalty()
    assert penalty.item() == pytest.approx(0.25 * moved.numel())
    penalty.backward()
    assert torch.allclose(moved.grad, torch.full_like(moved, 1.0))  # d/dp (p - p0)^2 = 2 * 0.5
    assert gain.grad is None and frozen.grad is None


def test_loss_distillation_raises_the_score_of_the_candidate_the_generator_answers_best_from():
    from clara_ray.training.settings import Distillation
    from clara_ray.modeling.text import Prompts, tokenize_targets, tokenize_texts

    model, tokenizer = make_model()
    prompts = tokenize_texts(tokenizer, [Prompts(tokenizer).question("Which city was Zorvan Kellit born in?")] * 2, 32)
    targets = tokenize_targets(tokenizer, [" Marlow"] * 2, 8)
    candidate_memory = torch.randn(2, 4, model.num_memory_tokens, model.hidden_size)
    # The generator's own losses, per candidate read alone (what distillation measures):
    with torch.no_grad():
        per_candidate = torch.stack([
            model.generator_losses(candidate_memory[:, j], prompts.ids, prompts.mask, targets.ids, targets.mask)
            for j in range(4)
        ], dim=1)  # (2, 4)
    assert per_candidate.shape == (2, 4) and torch.isfinite(per_candidate).all()
    scores = torch.zeros(2, 4, requires_grad=True)  # every candidate drawn: the outcome does not depend on the draw
    loss = model._loss_distillation(scores, candidate_memory, prompts.ids, prompts.mask, targets.ids, targets.mask,
                                    Distillation(candidates=4, weight=1.0, temperature=0.1))
    loss.backward()
    # d loss / d score = (softmax(scores / tau) - softmax(-losses)) / tau: the best-answering candidate goes up most.
    expected = (torch.full((2, 4), 0.25) - torch.softmax(-per_candidate, dim=-1)) / 0.1 / 2
    torch.testing.assert_close(scores.grad, expected, rtol=1e-4, atol=1e-5)
    assert (scores.grad.argmin(-1) == per_candidate.argmin(-1)).all()
    assert not any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # losses: no gradient


def test_generator_losses_are_per_example_means_that_average_to_the_batch_loss_when_lengths_match():
    from clara_ray.modeling.text import Prompts, tokenize_targets, tokenize_texts

    model, tokenizer = make_model()
    prompts = tokenize_texts(tokenizer, [Prompts(tokenizer).question("Which city?"), Prompts(tokenizer).question("What job?")], 32)
    targets = tokenize_targets(tokenizer, [" Marlow", " baker"], 8)
    memory = torch.randn(2, model.num_memory_tokens, model.hidden_size)
    with torch.no_grad():
        each = model.generator_losses(memory, prompts.ids, prompts.mask, targets.ids, targets.mask)
        both = model.generator_loss(memory, prompts.ids, prompts.mask, targets.ids, targets.mask)
        first = model.generator_loss(memory[:1], prompts.ids[:1], prompts.mask[:1], targets.ids[:1], targets.mask[:1])
    torch.testing.assert_close(each[0], first)
    if targets.mask[0].sum() == targets.mask[1].sum():
        torch.testing.assert_close(each.mean(), both)


def test_lower_anchor_pulls_only_the_lora_below_the_free_top_layers():
    from clara_ray.training.engine import ParameterAnchor

    model, _ = make_model()  # 2 decoder layers
    model.set_trainable([Role.QUERY_REASONER], backbone=False)
    assert ParameterAnchor(model, 1e-3).lower_params == []  # lower weight 0: nothing copied
    anchor = ParameterAnchor(model, 0.0, lower_weight=1e-2, free_top_layers=1)
    assert anchor.params == [] and anchor.penalty().item() == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    lower = [names[id(p)] for p in anchor.lower_params]
    assert lower and all(".layers.0." in n and "lora_" in n and ".query_reasoner." in n for n in lower)
    top = next(p for n, p in model.role_parameters(Role.QUERY_REASONER).items() if ".layers.1." in n)
    low = anchor.lower_params[0]
    with torch.no_grad():
        top.add_(1.0)
        low.add_(0.5)
    assert anchor.lower_penalty().item() == pytest.approx(0.25 * low.numel())  # the top layer moves freely
    assert ParameterAnchor(model, 0.0, lower_weight=1e-2, free_top_layers=2).lower_params == []
