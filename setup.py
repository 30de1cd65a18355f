from setuptools import find_packages, setup

setup(
    name="cbir",
    version="0.1.0",
    description="Content-based image retrieval over a category-partitioned database",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cbir", "cbir.*"]),
    package_data={"cbir": ["data/*.json", "data/*.h5", "data/*.html"]},
    install_requires=[
        "numpy>=1.24",
        "scipy>=1.10",
        "pillow>=10.0",
        "pillow-heif>=0.16",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "keras>=3.0",
        "tensorflow>=2.16",
        "openvino>=2024.0",
        "faiss-cpu>=1.8",  # k-means for the inverted file of large databases (cbir.db.ivf)
        "fastapi>=0.110",  # cbir serve: routing, validation, OpenAPI
        "uvicorn>=0.29",  # cbir serve: the ASGI server
        "python-multipart>=0.0.9",  # cbir serve: image uploads
        "openTSNE>=1.0",  # cbir map: FFT-accelerated t-SNE, 60k images in minutes on 2 cores
    ],
    extras_require={
        "ray": ["ray>=2.9"],  # create-db/add --ray: actors on a cluster (cbir.cluster)
        # selenium drives Chromium in the page tests; ray runs the cluster tests
        "test": ["pytest>=7", "selenium>=4.10", "ray>=2.9"],
        "dev": ["pytest>=7", "selenium>=4.10", "ray>=2.9", "ruff"],
    },
    entry_points={"console_scripts": ["cbir = cbir.cli:main"]},
    scripts=["bin/cbir"],
)
