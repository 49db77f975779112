"""The lm-eval adapter on a tiny model and a local toy task (skipped without the eval extra)."""

import json

import pytest
import torch

from kvtuner import KVPlan
from kvtuner.testing import tiny_model

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'kvtuner[eval]'")


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{chr(32 + i): 3 + i for i in range(95)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


@pytest.fixture
def toy_task(tmp_path):
    rows = [{"question": f"{a}+{b}=", "answer": str(a + b), "choices": [str(a + b), str(a + b + 1)]}
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    (tmp_path / "toy.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'toy.jsonl'}\n"
              "test_split: test\ndoc_to_text: '{{question}}'\n")
    (tmp_path / "toy_gen.yaml").write_text(
        "task: kvtuner_toy_gen\n" + common + "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 40\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (tmp_path / "toy_mc.yaml").write_text(
        "task: kvtuner_toy_mc\n" + common + "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: 0\nmetric_list:\n  - metric: acc\n")
    return tmp_path


def _run(lm, path, task):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(path)),
                                   log_samples=True)


def test_adapter_runs_tasks_through_the_quantized_cache(toy_task):
    from kvtuner.lm_eval_adapter import kvtuner_lm

    model = tiny_model("llama", vocab=98, layers=2)
    tok = _char_tokenizer()
    for task in ("kvtuner_toy_gen", "kvtuner_toy_mc"):
        full = _run(kvtuner_lm(model, tok, None), toy_task, task)
        same = _run(kvtuner_lm(model, tok, KVPlan.uniform(2, 16, 16)), toy_task, task)
        low = _run(kvtuner_lm(model, tok, KVPlan.uniform(2, 2, 2, "per_token")), toy_task, task)
        assert set(full["results"][task]) & {"exact_match,none", "acc,none"}
        outputs = [[s["resps"] for s in r["samples"][task]] for r in (full, same, low)]
        assert outputs[0] == outputs[1]  # 16 bits reproduces full precision exactly
        if task == "kvtuner_toy_mc":  # log-likelihoods move once keys and values are quantized
            assert outputs[2] != outputs[0]
        else:
            assert all(len(resp[0][0]) > 0 for resp in outputs[2])
    with pytest.raises(Exception, match="plan.num_layers=30"):
        kvtuner_lm(model, tok, KVPlan.uniform(30, 4, 4))
    assert torch.is_tensor(model.lm_head.weight)
