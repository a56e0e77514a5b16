"""Training and evaluation pipeline (imports dicomnode; dicomnode never imports training)."""
