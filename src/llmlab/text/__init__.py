"""Classic NLP before the decoder: text normalisation and splitting, the Porter stemmer, stop words,
bag-of-words / TF-IDF / n-gram features, a logistic-regression baseline and a Kneser-Ney n-gram language
model. Torch and the standard library only; each module names its paper and its reference library.
"""
