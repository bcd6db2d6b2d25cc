/* A float64 reference forward pass for the tests: independent of the engine, written from
 * docs/architectures.md (Mixtral "llama", qwen2moe, qwen3moe, olmoe). Slow and plain. */
#ifndef MOERUN_REF_FORWARD_H
#define MOERUN_REF_FORWARD_H

#include <stddef.h>
#include <stdint.h>

/* Evaluate tokens[0..n-1] at positions 0..n-1 of the GGUF model at gguf_path, every weight
 * dequantized to double and every operation in double.
 * round_acts: 1 = round each matrix-product input to the weight's companion type and back
 * (F16, BF16, Q8_0 or Q8_K blocks, through float), as llama.cpp's CPU backend does; 0 = exact.
 * logits: [n][n_vocab], every position's.
 * Returns 0, or a negative MOERUN_ERR_* code with a message on stderr naming what failed. */
int ref_forward(const char *gguf_path, const int32_t *tokens, size_t n, int round_acts,
                double *logits);

/* ref_forward, and the smallest difference between the k-th and the (k+1)-th largest router
 * logit over every layer and position (INFINITY when k = E) into *min_router_gap when not NULL:
 * how far the routing is from a tie, so a test can avoid prompts whose routing small rounding
 * differences could flip. */
int ref_forward_gap(const char *gguf_path, const int32_t *tokens, size_t n, int round_acts,
                    double *logits, double *min_router_gap);

/* n_vocab of the model at gguf_path as ref_forward sees it (tokenizer.ggml.tokens, else
 * token_embd's ne1); 0 on error. */
uint32_t ref_n_vocab(const char *gguf_path);

/* How the tests hold the engine to ref_forward (test_forward.c says how these were found).
 * Routing within REF_GAP_F32 / REF_GAP_QUANT of a tie (ref_forward_gap) may flip under any
 * rounding difference, so a miss there is reported, not failed.
 * Quantized weights: the CPU, as llama.cpp's, rounds matrix inputs to Q8_0 / Q8_K, from values
 * that differ from the reference's in the last float bits, so now and then one element rounds the
 * other way and the difference spreads: REF_QUANT_TOL against ref_forward(round_acts = 1). CUDA
 * rounds no activation to Q8 (its matvecs keep x in F32, a prompt's GEMM stages x as F16):
 * REF_CUDA_QUANT_TOL against ref_forward(round_acts = 0). */
#define REF_GAP_F32        1e-4
#define REF_GAP_QUANT      0.1
#define REF_F32_TOL        1e-4
#define REF_QUANT_TOL      5e-2
#define REF_CUDA_QUANT_TOL 3e-3

#endif /* MOERUN_REF_FORWARD_H */
