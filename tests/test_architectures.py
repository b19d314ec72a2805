import pytest
import torch
from conftest import FAMILIES, MAIN_FAMILIES, tiny_config
from transformers import AutoModelForCausalLM

from compress.architectures import TESTED_FAMILIES, UnsupportedArchitectureError, get_blocks, layer_layout, num_layers, select_layers, student_from_config, student_from_teacher


def test_every_supported_family_has_a_tiny_test_config():
    assert set(TESTED_FAMILIES) == set(FAMILIES), "add a tiny config in tests/conftest.py for each family in TESTED_FAMILIES (and vice versa)"
    assert set(MAIN_FAMILIES) <= set(FAMILIES)


@pytest.mark.parametrize("total,count,expected", [(30, 10, [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]), (4, 2, [0, 3]), (5, 1, [4]), (3, 3, [0, 1, 2])])
def test_select_layers_evenly_spaced(total, count, expected):
    assert select_layers(total, count) == expected


def test_select_layers_rejects_bad_requests():
    with pytest.raises(ValueError, match="cannot keep 5 of the teacher's 4 layers"):
        select_layers(4, 5)
    with pytest.raises(ValueError, match=r"indices \[7\] out of range"):
        select_layers(4, [0, 7])
    assert select_layers(6, [5, 1]) == [1, 5]


@pytest.mark.parametrize("family", FAMILIES)
def test_student_copies_kept_layers(family):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config(family, layers=4)).eval()
    student, keep = student_from_teacher(teacher, [1, 3])
    assert keep == [1, 3]
    assert num_layers(student.config) == 2
    t_blocks, s_blocks = get_blocks(teacher), get_blocks(student)
    for new, old in enumerate(keep):
        for (name, a), (_, b) in zip(t_blocks[old].state_dict().items(), s_blocks[new].state_dict().items()):
            assert torch.equal(a, b), f"{family} block {old}->{new}: {name} differs"
    assert torch.equal(teacher.get_output_embeddings().weight, student.get_output_embeddings().weight)
    assert torch.equal(teacher.get_input_embeddings().weight, student.get_input_embeddings().weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_all_layers_reproduces_the_teacher(family):
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_config(family, layers=3)).eval()
    student, _ = student_from_teacher(teacher, 3)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        assert torch.allclose(teacher(ids).logits, student.eval()(ids).logits, atol=1e-6)


def test_tied_head_stays_tied():
    teacher = AutoModelForCausalLM.from_config(tiny_config("llama"))
    student, _ = student_from_teacher(teacher, 2)
    assert student.get_output_embeddings().weight.data_ptr() == student.get_input_embeddings().weight.data_ptr()


def test_student_from_config_overrides():
    config = tiny_config("qwen2", layers=4)
    student = student_from_config(config, {"num_hidden_layers": 2, "intermediate_size": 48}, seed=0)
    assert num_layers(student.config) == 2 and student.config.intermediate_size == 48
    assert len(student.config.layer_types) == 2
    with pytest.raises(ValueError, match="student.config.not_a_key"):
        student_from_config(config, {"not_a_key": 1}, seed=0)


def test_unsupported_architecture_is_named():
    from transformers import BertConfig

    with pytest.raises(UnsupportedArchitectureError, match="unsupported architecture 'bert'"):
        layer_layout(BertConfig())
