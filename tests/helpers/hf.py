# A native Llama as transformers' LlamaForCausalLM (tests/test_models.py, tests/test_hf.py), built with the
# family's own conversion (models/llama.py: hf_config, to_hf), which the Hugging Face export uses too.
from models import hf_export


def as_hf_llama(ours):
    import transformers

    config, state = hf_export(ours.args, dict(ours.state_dict()))
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(state, strict=True)
    return hf
