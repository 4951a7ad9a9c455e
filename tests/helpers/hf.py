# A native Llama as transformers' LlamaForCausalLM (tests/test_models.py, tests/test_hf.py): native parameter
# names -> transformers' LlamaForCausalLM's.
_HF_LLAMA_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}  # fmt: skip


def as_hf_llama(ours):
    # A native Llama as transformers' LlamaForCausalLM: the same shapes and the same tensors, renamed.
    import transformers

    args = ours.args
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_seq_len,
        rms_norm_eps=args.norm_eps,
        rope_theta=args.rope_theta,
        tie_word_embeddings=args.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
    )
    state = {"model.embed_tokens.weight": ours.tok_embeddings.weight, "model.norm.weight": ours.norm.weight}
    state["lm_head.weight"] = ours.output.weight
    for i, layer in enumerate(ours.layers):
        for name, p in layer.named_parameters():
            module, _, leaf = name.rpartition(".")
            state[f"model.layers.{i}.{_HF_LLAMA_NAMES[module]}.{leaf}"] = p
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(state, strict=True)
    return hf
