"""The shared fixtures load back through the user code path (AutoModel/AutoTokenizer from a folder)."""

from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM


def test_tokenizer_has_chat_template_and_pad(tokenizer):
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_tiny_models_reload(teacher_dir, student_dir, t5_student_dir, tokenizer):
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert teacher.config.num_hidden_layers == 4 and student.config.hidden_size == 64
    assert teacher.config.vocab_size == student.config.vocab_size == len(tokenizer)
    assert AutoModelForSeq2SeqLM.from_pretrained(t5_student_dir).config.d_model == 64
