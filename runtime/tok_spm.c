/* SentencePiece-style BPE ("llama"), as llama.cpp's llm_tokenizer_spm: the symbols are the
 * UTF-8 characters of the text (spaces escaped to U+2581), adjacent pairs whose concatenation
 * is a token merge by score (highest first, leftmost on ties) through a heap, and whatever is
 * left that is not a token falls back to <0xXX> byte tokens. */
#include "tok_impl.h"
#include "unicode.h"

#include <string.h>

struct spm_work {
    const struct mr_vocab *v;
    const char *text;
    struct tok_sym *sym;
    struct tok_bigram *heap;
    size_t n_heap;
};

static void try_add_bigram(struct spm_work *w, int32_t left, int32_t right) {
    if (left < 0 || right < 0)
        return;
    uint32_t size = w->sym[left].n + w->sym[right].n;
    int32_t id = vocab_find(w->v, w->text + w->sym[left].start, size);
    if (id < 0)
        return;
    struct tok_bigram b = {w->v->score[id], left, right, size}; /* highest score first */
    tok_heap_push(w->heap, &w->n_heap, b);
}

/* llama.cpp's byte_to_token: "<0xXX>", else the byte itself as a token; else unk (llama.cpp
 * throws there), else nothing */
static int32_t byte_token(const struct mr_vocab *v, unsigned char c) {
    static const char hex[] = "0123456789ABCDEF";
    char buf[6] = {'<', '0', 'x', hex[c >> 4], hex[c & 15], '>'};
    int32_t id = vocab_find(v, buf, 6);
    if (id < 0)
        id = vocab_find(v, (const char *)&c, 1);
    if (id < 0)
        id = v->unk;
    return id;
}

int tok_spm_encode(const struct mr_vocab *v, const char *text, size_t len, bool space_prefix,
                   struct tok_out *out) {
    if (len == 0 && !space_prefix)
        return MOERUN_OK;
    if (len > UINT32_MAX / 4)
        return mr_err(MOERUN_ERR_RANGE, "tokenizer: text of %zu bytes is too long", len);
    const moerun_allocator *a = v->a;
    size_t n_space = space_prefix;
    for (size_t i = 0; i < len; i++)
        n_space += text[i] == ' ';
    size_t esc_len = len + space_prefix + 2 * n_space;
    char *esc = mr_alloc(a, esc_len, 0);
    struct tok_sym *sym = mr_alloc(a, esc_len * sizeof(*sym), 0);
    struct tok_bigram *heap = mr_alloc(a, 3 * esc_len * sizeof(*heap), 0);
    int rc = MOERUN_OK;
    if (!esc || !sym || !heap) {
        rc = mr_err(MOERUN_ERR_NOMEM, "tokenizer: out of memory for %zu bytes of text", len);
        goto out_free;
    }
    size_t o = 0;
    if (space_prefix) {
        memcpy(esc, "\xE2\x96\x81", 3);
        o = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(esc + o, "\xE2\x96\x81", 3);
            o += 3;
        } else
            esc[o++] = text[i];
    }

    int32_t n_sym = 0;
    for (size_t off = 0; off < esc_len;) {
        size_t clen = unicode_len_utf8((unsigned char)esc[off]);
        if (clen > esc_len - off)
            clen = esc_len - off;
        struct tok_sym *s = &sym[n_sym];
        s->start = (uint32_t)off;
        s->n = (uint32_t)clen;
        s->prev = n_sym - 1;
        off += clen;
        s->next = off == esc_len ? -1 : n_sym + 1;
        n_sym++;
    }
    struct spm_work w = {.v = v, .text = esc, .sym = sym, .heap = heap};
    for (int32_t i = 1; i < n_sym; i++)
        try_add_bigram(&w, i - 1, i);
    while (w.n_heap > 0) {
        struct tok_bigram b = tok_heap_pop(heap, &w.n_heap);
        struct tok_sym *l = &sym[b.left], *r = &sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size)
            continue;
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0)
            sym[r->next].prev = b.left;
        try_add_bigram(&w, l->prev, b.left);
        try_add_bigram(&w, b.left, l->next);
    }
    /* resegment: symbols are tokens or single characters (merges only make tokens) */
    for (int32_t i = 0; i != -1 && rc == MOERUN_OK; i = sym[i].next) {
        const struct tok_sym *s = &sym[i];
        int32_t id = vocab_find(v, esc + s->start, s->n);
        if (id >= 0) {
            rc = tok_out_push(out, id);
            continue;
        }
        for (uint32_t j = 0; j < s->n && rc == MOERUN_OK; j++) {
            int32_t bid = byte_token(v, (unsigned char)esc[s->start + j]);
            if (bid >= 0)
                rc = tok_out_push(out, bid);
        }
    }
    if (rc == MOERUN_ERR_NOMEM)
        mr_err(rc, "tokenizer: out of memory");
out_free:
    mr_free(a, heap);
    mr_free(a, sym);
    mr_free(a, esc);
    return rc;
}
