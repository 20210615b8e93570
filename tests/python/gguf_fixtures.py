"""Tiny GGUF models written by the reference `gguf` package, for tests/python/test_gguf.py.

Each model is what llama.cpp's converter would write for a tiny Llama/Qwen2/Qwen3: llama.cpp tensor names, {arch}.*
metadata, a byte-level BPE tokenizer, and for Llama the q/k rows interleaved the way llama.cpp's converter does it.
Weights are known fp32 tensors quantized by gguf.quants.quantize where the package has a quantizer; the K-quants have
none in Python, so their blocks are random bytes with small finite scales (gguf.quants.dequantize still decodes them).
"""
import numpy as np

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, CTX = 256, 4, 2, 512, 2, 128
HEAD_DIM = HIDDEN // HEADS


def byte_alphabet():
    """GPT-2's byte -> printable character table (a published fact of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tokenizer_metadata():
    tokens = byte_alphabet() + ["Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    merges = ["Ġ t", "h e", "Ġt he"]
    return tokens, types, merges


def llama_permute(w, n_head):
    """llama.cpp's converter interleaves the two RoPE halves of each q/k head (convert_hf_to_gguf.py, LlamaModel)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(qtype, rows, cols, rng):
    """Valid blocks of a type without a Python quantizer: random bytes, small finite scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scale = lambda n: rng.uniform(1e-4, 3e-4, size=(raw.shape[0], n)).astype(np.float16).view(np.uint8)
    if qtype in (T.Q4_K, T.Q5_K):
        raw[:, 0:4] = scale(2)  # d, dmin
    elif qtype == T.Q6_K:
        raw[:, 208:210] = scale(1)  # d comes last
        raw[:, 192:208] = rng.integers(-8, 8, size=(raw.shape[0], 16), dtype=np.int8).view(np.uint8)
    elif qtype == T.Q8_K:
        raw[:, 0:4] = rng.uniform(1e-4, 3e-4, size=(raw.shape[0], 1)).astype(np.float32).view(np.uint8)
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, cols // block * size)


def encode(values, qtype, rng):
    """(stored array, raw_dtype) for add_tensor: quantized by the reference package, or random K-quant blocks."""
    import gguf
    from gguf import GGMLQuantizationType as T
    if qtype == T.F32:
        return values.astype(np.float32), None
    if qtype == T.F16:
        return values.astype(np.float16), None
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K):
        return random_blocks(qtype, values.shape[0], values.shape[1], rng), qtype
    return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def write_model(path, arch="llama", qtype=None, embed_qtype=None, seed=0, tied=True, iq_tensor=None, head_dim=None,
                head_qtype=None):
    """Writes a tiny model; linear weights in `qtype`, the embedding in `embed_qtype`, an untied head in
    `head_qtype` (default `qtype`), norms and biases F32.
    `iq_tensor` is stored as IQ2_XXS (zero bytes), a type kiln refuses. `head_dim` may differ from hidden / heads
    (as in real Qwen3 models). Returns {gguf name: (stored array, qtype)}."""
    HEAD_DIM = head_dim or HIDDEN // HEADS
    import gguf
    from gguf import GGMLQuantizationType as T
    qtype = T.F32 if qtype is None else qtype
    embed_qtype = qtype if embed_qtype is None else embed_qtype
    rng = np.random.default_rng(seed)
    tokens, types, merges = tokenizer_metadata()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(LAYERS)
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    stored = {}

    def add(name, values, t):
        if name == iq_tensor:
            t = T.IQ2_XXS
            data, raw = np.zeros((values.shape[0], values.shape[1] // 256 * 66), np.uint8), t
        else:
            data, raw = encode(values, t, rng)
        if raw is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=raw)
        stored[name] = (data, t)

    normal = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)
    add("token_embd.weight", normal(len(tokens), HIDDEN), embed_qtype)
    add("output_norm.weight", 1 + normal(HIDDEN), T.F32)
    if not tied:
        add("output.weight", normal(len(tokens), HIDDEN), qtype if head_qtype is None else head_qtype)
    for i in range(LAYERS):
        q, k = normal(HEADS * HEAD_DIM, HIDDEN), normal(KV_HEADS * HEAD_DIM, HIDDEN)
        if arch == "llama":
            q, k = llama_permute(q, HEADS), llama_permute(k, KV_HEADS)
        add(f"blk.{i}.attn_norm.weight", 1 + normal(HIDDEN), T.F32)
        add(f"blk.{i}.attn_q.weight", q, qtype)
        add(f"blk.{i}.attn_k.weight", k, qtype)
        add(f"blk.{i}.attn_v.weight", normal(KV_HEADS * HEAD_DIM, HIDDEN), qtype)
        add(f"blk.{i}.attn_output.weight", normal(HIDDEN, HEADS * HEAD_DIM), qtype)
        if arch == "qwen2":
            for p, n in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                add(f"blk.{i}.attn_{p}.bias", normal(n * HEAD_DIM), T.F32)
        if arch == "qwen3":
            add(f"blk.{i}.attn_q_norm.weight", 1 + normal(HEAD_DIM), T.F32)
            add(f"blk.{i}.attn_k_norm.weight", 1 + normal(HEAD_DIM), T.F32)
        add(f"blk.{i}.ffn_norm.weight", 1 + normal(HIDDEN), T.F32)
        add(f"blk.{i}.ffn_gate.weight", normal(FFN, HIDDEN), qtype)
        add(f"blk.{i}.ffn_up.weight", normal(FFN, HIDDEN), qtype)
        add(f"blk.{i}.ffn_down.weight", normal(HIDDEN, FFN), qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def dequantized(data, qtype):
    """The reference decoding: gguf.quants.dequantize; Q8_K, which the package does not decode, by its definition
    (an f32 scale times 256 int8 values; the 16 int16 block sums are not part of the value)."""
    import gguf
    from gguf import GGMLQuantizationType as T
    if qtype in (T.F32, T.F16):
        return data.astype(np.float32)
    if qtype == T.Q8_K:
        blocks = data.reshape(-1, 292)
        d = blocks[:, :4].copy().view(np.float32)
        q = blocks[:, 4:260].copy().view(np.int8).astype(np.float32)
        return (d * q).reshape(data.shape[0], -1)
    return gguf.quants.dequantize(data, qtype)
