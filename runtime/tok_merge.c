/* The merge heap shared by the SentencePiece and BPE tokenizers. */
#include "tok_impl.h"

static bool before(const struct tok_bigram *x, const struct tok_bigram *y) {
    return x->key > y->key || (x->key == y->key && x->left < y->left);
}

void tok_heap_push(struct tok_bigram *h, size_t *n, struct tok_bigram b) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!before(&b, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = b;
}

struct tok_bigram tok_heap_pop(struct tok_bigram *h, size_t *n) {
    struct tok_bigram top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n)
            break;
        if (c + 1 < *n && before(&h[c + 1], &h[c]))
            c++;
        if (!before(&h[c], &last))
            break;
        h[i] = h[c];
        i = c;
    }
    if (*n > 0)
        h[i] = last;
    return top;
}
