"""Generates text with a KV cache from a glam_jax workdir, a Hugging Face directory (Mixtral,
OLMoE, Qwen1.5/2/3-MoE: glam_jax/hf_checkpoint.py), or random weights (for throughput); the
program is glam_jax/commands/generate.py (also `glam-generate`).

python experiments/generate.py --config=configs/glam_tiny.py --workdir=/tmp/glam_tiny \
    --prompt="ROMEO:" --max_new_tokens=64 --temperature=0.8 --top_p=0.9
python experiments/generate.py --hf_dir=/data/Mixtral-8x7B-v0.1 \
    --tokenizer=.../mistral_common/data/tokenizer.model.v1 --prompt="The capital of France is"
python experiments/generate.py --config=configs/mixtral.py:size=8x7b --random_init \
    --config.model.param_dtype=bfloat16 --config.model.dtype=bfloat16 \
    --random_prompts=8 --prompt_len=512 --max_new_tokens=128 --ignore_eos --json
"""

from glam_jax.commands import generate

if __name__ == "__main__":
    generate.entry()
