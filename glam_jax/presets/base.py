"""The one base config every glam_jax config starts from; each field says what it does.

Configs compose: a GLaM size is `get_base_config()` plus a few overrides (see `glam.py`).
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
    """Returns the full set of knobs with GLaM defaults (top-2 GShard MoE every other layer)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # seeds parameter init, dropout, routing noise and data shuffling

    # ---- model -------------------------------------------------------------------------------
    m = config.model = ml_collections.ConfigDict()
    m.vocab_size = 32000  # tokenizer vocabulary (also the SentencePiece size trained at first use)
    m.num_layers = 12  # transformer layers; must be a multiple of moe.every
    m.embed_dim = 768  # M, model width
    m.mlp_dim = 3072  # H, hidden width of the dense FFN and (by default) of every expert
    m.num_heads = 12  # attention query heads
    m.num_kv_heads = 0  # key/value heads for grouped-query attention; 0 = same as num_heads
    m.head_dim = 64  # per-head width
    m.max_len = 2048  # longest sequence the model supports (checked against train.seq_len)
    m.norm = "rmsnorm"  # 'rmsnorm' (GLaM: scale only, no bias) or 'layernorm'
    m.norm_eps = 1e-6  # epsilon inside the norm
    m.ffn_activation = "gelu"  # 'gelu' (GLaM gated GELU) or 'silu' (SwiGLU, Mixtral)
    m.ffn_glu = True  # gated FFN: two input matrices and one output; False = paper-count 2 matrices
    m.position = "relative_bias"  # 'relative_bias' (T5 buckets, GLaM), 'rope' (Mixtral) or 'none'
    m.rope_theta = 10_000.0  # RoPE base frequency (position='rope'); Mixtral 8x7B uses 1e6
    m.sliding_window = 0  # a query sees only the last `sliding_window` keys (Mistral); 0 = off
    m.attention_scale = 0.0  # softmax scale on q.k; 0 = 1/sqrt(head_dim) (GLaM, Mixtral)
    m.rel_buckets = 32  # relative-position buckets (T5/GLaM)
    m.rel_max_distance = 128  # distance past which all offsets share the last bucket
    m.tie_embeddings = True  # output softmax shares the token embedding (GLaM)
    m.logits_via_embedding_scale = True  # scale tied logits by 1/sqrt(M) so they start O(1)
    m.dtype = "bfloat16"  # activation / compute dtype ('float32' for exact CPU tests)
    m.param_dtype = "float32"  # parameter storage dtype
    m.attention_impl = (
        "auto"  # 'auto' (cuDNN flash on GPU when it applies, else XLA), 'xla', 'cudnn'
    )
    m.document_mask = True  # attention stays inside each document of a packed row. False lets
    # it cross documents (Megatron-LM's default) and spares cuDNN a dense [B, H, S, S]
    # mask-plus-bias; results are identical when every row holds one document.
    m.segments = ""  # layer stack as "(kind,...)*repeats ..." of FFN kinds dense|moe, e.g.
    # "(dense)*2 (dense,moe)*3"; one scan per segment. "" = moe.every-layer blocks, one segment
    m.scan_layers = True  # one nn.scan per segment (compiles once whatever the depth);
    # False unrolls them: no per-layer slicing of stacked weights/residuals, slower compiles
    m.remat_policy = "none"  # scan-body rematerialisation: see glam_jax/model.py REMAT_POLICIES
    m.remat_scope = "block"  # what remat covers: 'block' (the scan body) or 'ffn' (FFN/MoE only)
    m.dropout_rate = 0.0  # dropout on attention/FFN outputs (GLaM pretraining uses 0)
    m.init_std = 0.02  # stddev of the normal init of projections and embeddings
    # -- attention features of the Hugging Face MoE families (glam_jax/hf_checkpoint.py) --
    m.qk_norm = "none"  # RMSNorm of q and k before RoPE: 'none', 'head' (over head_dim,
    # Qwen3-MoE) or 'projection' (over all heads of the q or k projection at once, OLMoE)
    m.qkv_bias = False  # learned biases on the q/k/v projections (Qwen2/1.5-MoE)

    # ---- mixture of experts -------------------------------------------------------------------
    e = config.moe = ml_collections.ConfigDict()
    e.num_experts = 64  # E; 0 makes every FFN dense (dense baselines)
    e.every = 2  # one MoE layer in each block of `every` layers; the scan body is one block
    e.moe_index_in_block = 1  # which layer of a block holds the MoE FFN (1: dense then MoE)
    e.num_selected = 2  # k experts per token (top-k); routers with a fixed k check it
    e.expert_mlp_dim = 0  # hidden width of one expert; 0 = model.mlp_dim (fine-grained
    # experts, DeepSeekMoE: more, narrower experts, e.g. model.mlp_dim / 4 with 4x the k)
    e.num_shared_experts = 0  # DeepSeekMoE shared experts every token visits; 0 = off
    e.shared_expert_mlp_dim = 0  # their one dense FFN's width; 0 = num_shared_experts x
    # (expert_mlp_dim or model.mlp_dim), as DeepSeek-V2/V3 build it (Qwen2-MoE sets it)
    e.shared_expert_gate = "none"  # 'none' or 'sigmoid' (Qwen2-MoE: sigmoid(x w_gate) scales it)
    e.expert_bias_update_rate = 0.0  # gamma of DeepSeek-V3 auxiliary-loss-free balancing:
    # after each step b_e += gamma * sign(mean load - load_e), b chooses the top k only; 0 = off
    e.router = "gshard_top2"  # a name in glam_jax/moe/routers.py ROUTERS
    e.dispatch = "einsum"  # 'einsum' (GShard one-hot), 'sort' (gather/scatter) or 'dropless'
    e.group_size = 1024  # tokens per routing group; capacity is computed per group
    e.capacity_factor_train = 1.25  # capacity multiplier while training
    e.capacity_factor_eval = 2.0  # capacity multiplier at evaluation (GLaM evaluates larger)
    e.capacity_convention = "gshard"  # 'gshard': ceil(k*T/E*cf); 'praxis': ceil(T*cf/E) up to x4
    e.min_capacity = 4  # lower bound on the per-expert capacity of a group
    e.second_expert_policy = "random"  # GShard: dispatch expert 2 with prob min(1, 2*g2); 'all'
    e.aux_loss_weight = 0.01  # load-balancing loss E*sum_e f_e*P_e (GLaM 0.01)
    e.z_loss_weight = 1e-3  # ST-MoE router z-loss mean(logsumexp(logits)^2)
    e.importance_loss_weight = 0.0  # noisy_topk: Shazeer CV(importance)^2 weight (paper: 0.1)
    e.load_loss_weight = 0.0  # noisy_topk: Shazeer CV(load)^2 weight (paper: 0.1)
    e.router_init_scale = 1.0  # router weight init scale (Switch uses 0.1)
    e.router_jitter = 0.0  # Switch multiplicative jitter eps on the router input (train only)
    e.noisy_gating = True  # noisy_topk: learned noise on the logits in training
    e.expert_dropout = 0.0  # dropout inside experts (Switch fine-tuning uses 0.4)
    e.expert_exchange = "gspmd"  # 'gspmd' (XLA picks collectives; dropless gathers the
    # expert weights), 'all_to_all' (explicit; dropless: tokens to experts in padded slots) or
    # 'ragged_all_to_all' (dropless only, real rows only; GPU/TPU): glam_jax/moe/dispatch.py
    e.ragged_matmul = "auto"  # dropless grouped matmul: 'auto' (fastest that runs here),
    # 'blocked' (Hopper kernels, experts padded to 128-row tiles), 'mgpu' (jax's ragged
    # Hopper kernels), 'xla' (lax.ragged_dot; XLA:GPU lowers it to a dense masked dot)
    e.fused_glu = True  # 'blocked', gated experts: one kernel computes x @ wi_0, x @ wi_1 and
    # act(gate) * up in its epilogue; False: two kernels and an element-wise pass (A/B runs)
    e.decode_dispatch = "dropless"  # MoE dispatch when decoding, never dropping: 'dropless',
    # or 'einsum' / 'sort' with capacity = every token of the group (glam_jax/decode.py)
    # Routing zoo II (read by routers 'topk' and 'group_topk'; others refuse non-defaults):
    e.router_score = "softmax"  # expert scores: 'softmax' (OLMoE, Qwen) or 'sigmoid' (DeepSeek-V3)
    e.norm_topk_prob = False  # divide the k kept gates by their sum (Qwen3-MoE, DeepSeek-V3)
    e.routed_scaling_factor = 1.0  # multiplies the gates (DeepSeek-V3 uses 2.5)
    e.num_groups = 1  # group_topk: experts form this many equal groups (DeepSeek-V3: 8)
    e.topk_groups = 1  # group_topk: each token picks its experts within its best groups (V3: 4)
    e.group_score = "max"  # group_topk rank of a group: best score, or 'top2_sum' (DeepSeek-V3)
    e.sequence_aux_loss_weight = 0.0  # DeepSeek-V3 sequence-wise balance loss weight (1e-4)
    e.gate_norm = "before_capacity"  # every router: 'after_capacity' divides the gates by the
    # sum of those that survived capacity (Praxis non-legacy); default = router's own (legacy)

    # ---- device mesh --------------------------------------------------------------------------
    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (
        -1,
        1,
        1,
    )  # (data, expert, model) sizes; one -1 takes the remaining devices
    config.mesh.axis_rules = ()  # (logical axis, mesh axes) pairs overriding or extending the
    # rule table of glam_jax/sharding.py, e.g. (("vocab", None),) keeps the vocabulary unsplit

    # ---- data ---------------------------------------------------------------------------------
    d = config.data = ml_collections.ConfigDict()
    d.corpus = "tinyshakespeare"  # embedded corpus, used when text_files and tfds_name are empty
    d.text_files = ""  # comma-separated local text files or globs
    d.tfds_name = ""  # a prepared TFDS catalog dataset, e.g. 'lm1b'
    d.tfds_data_dir = ""  # TFDS data dir ('' = TFDS default)
    d.tfds_text_key = "text"  # feature holding the text
    d.tfds_train_split = "train"  # TFDS split for training
    d.tfds_eval_split = "validation"  # TFDS split for evaluation
    d.document_split = "blank_line"  # 'blank_line' | 'line' | 'file': what one document is
    d.undecodable_files = "error"  # a non-UTF-8 text file: 'error' (names it) or 'skip' it
    d.max_document_chars = 0  # leave out longer documents (e.g. generated source); 0 = keep all
    d.validation_fraction = 0.05  # share of documents held out for evaluation
    d.tokenizer_path = ""  # SentencePiece .model to load; '' = train one on the training split
    d.spm_model_type = "unigram"  # 'unigram' or 'bpe' when training a tokenizer
    d.cache_dir = ""  # prepared corpora and tokenizers; '' = <workdir>/data
    d.shuffle_seed = 0  # data order seed
    d.pretokenize = False  # tokenise both splits once, on all cores, into cached .npy arrays
    # (same batches; training reads ids instead of running SentencePiece in its input loop)
    d.tokenize_threads = 0  # SentencePiece threads for pretokenize; 0 = every core
    d.worker_count = 0  # grain worker processes (0 = in the training process)
    d.num_streams = 0  # training streams the global batch is read as; 0 = one per process.
    # A fixed value (a multiple of the process count dividing train.batch_size) makes the
    # global batches independent of how many processes read them.

    # ---- training -----------------------------------------------------------------------------
    t = config.train = ml_collections.ConfigDict()
    t.batch_size = 256  # global batch in rows; divisible by mesh data*expert
    t.eval_batch_size = 256  # global eval batch in rows
    t.seq_len = 1024  # tokens per row
    t.steps = 100_000  # training steps
    t.optimizer = "adafactor"  # 'adafactor' (GLaM recipe) or 'adamw'
    t.learning_rate = 0.01  # peak learning rate
    t.warmup_steps = 10_000  # linear warm-up steps
    t.decay = "rsqrt"  # after warm-up: 'rsqrt' (GLaM), 'cosine', or 'constant'
    t.min_learning_rate = 0.0  # floor for cosine decay
    t.weight_decay = 0.0  # decoupled weight decay (AdamW) / Adafactor weight_decay_rate
    t.adam_b1 = 0.9  # AdamW beta1
    t.adam_b2 = 0.95  # AdamW beta2
    t.adafactor_decay_rate = 0.8  # Adafactor second-moment decay exponent
    t.adafactor_clip_threshold = 1.0  # Adafactor update clipping (GLaM 1.0)
    t.grad_clip_norm = 1.0  # global-norm gradient clipping (0 disables)
    t.logits_z_loss_weight = 1e-4  # z-loss on the output logits (0 disables)
    t.max_nonfinite_steps = 10  # consecutive steps with a non-finite loss or gradient norm
    # (their updates are skipped) after which the run stops with an error
    t.log_every = 50  # steps between metric rows
    t.eval_every = 500  # steps between evaluations (0 = only at the end)
    t.eval_batches = 0  # batches per evaluation (0 = the whole validation split)
    t.checkpoint_every = 1000  # steps between checkpoints (0 = only at the end, -1 = never)
    t.keep_checkpoints = 3  # newest checkpoints kept
    t.keep_best = False  # also keep the best checkpoint by eval loss
    t.async_checkpoint = True  # write checkpoints in the background
    t.progress_bar = True  # tqdm bar with loss and tokens/s
    t.peak_tflops = 0.0  # device bf16 peak for MFU logging; 0 = look up the device kind
    return config
