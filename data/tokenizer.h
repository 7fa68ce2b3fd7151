// data/tokenizer.h: PLACEHOLDER until the tokenizer lands.
#ifndef MOLT_DATA_TOKENIZER_H
#define MOLT_DATA_TOKENIZER_H
#endif
