/* Tokenizer (internal): the vocabulary from the GGUF metadata, SentencePiece-style ("llama")
 * and byte-level BPE ("gpt2") with the pre-tokenizer that tokenizer.ggml.pre names.
 * The public functions (moerun_tokenize, moerun_token_to_piece, moerun_detok_*,
 * moerun_token_bos/eos/is_eog, moerun_model_n_vocab) wrap these through model->vocab. */
#ifndef MOERUN_TOKENIZER_H
#define MOERUN_TOKENIZER_H

#include "gguf.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct mr_vocab;

/* Load from tokenizer.ggml.* (model, pre, tokens, scores, token_type, merges, bos/eos/unk/...
 * ids, add_bos_token/add_eos_token, add_space_prefix). Returns MOERUN_OK with *out,
 * 1 with *out = NULL when the file has no tokenizer.ggml.tokens, or an error
 * (MOERUN_ERR_FORMAT for inconsistent metadata, MOERUN_ERR_UNSUPPORTED for an unknown
 * tokenizer.ggml.model or tokenizer.ggml.pre) naming the key. */
int vocab_load(const struct gguf_ctx *g, const moerun_allocator *a, struct mr_vocab **out);
void vocab_free(struct mr_vocab *v); /* NULL is a no-op */

uint32_t vocab_n_tokens(const struct mr_vocab *v);

#endif /* MOERUN_TOKENIZER_H */
