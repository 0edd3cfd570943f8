"""`cofeat embed`: project images (and users' factors) into Milvus, behind aliases."""
