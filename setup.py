import sys

if sys.version_info < (3, 11):  # before anything is downloaded or built
    sys.exit("msgrelay needs Python 3.11 or newer; this is Python %s "
             "(make the venv with e.g. python3.11 -m venv .venv)" % sys.version.split()[0])

from pathlib import Path  # noqa: E402

from setuptools import setup  # noqa: E402
from setuptools.command.build_py import build_py  # noqa: E402


class BuildPy(build_py):
    """Ship etc/msgrelay.toml inside the package (`msgrelay-admin config example` prints it)."""

    def run(self) -> None:
        super().run()
        self.copy_file("etc/msgrelay.toml", str(Path(self.build_lib) / "msgrelay" / "msgrelay.toml"))


setup(
    name="msgrelay",
    version="0.1.0",
    description="A federated store-and-forward relay for end-to-end-encrypted messages",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Framework :: Twisted",
        "Topic :: Communications",
    ],
    packages=[
        "msgrelay",
        "msgrelay.wire",
        "msgrelay.store",
        "msgrelay.web",
        "msgrelay.webapp",
        "msgrelay.client",
        "msgrelay.federation",
        "msgrelay.admin",
        "msgrelay.control",
        "msgrelay.net",
        "twisted.plugins",
    ],
    package_data={"msgrelay.web": ["errors.md"], "msgrelay.webapp": ["static/*", "static/*/*"], "twisted.plugins": ["msgrelay_plugin.py"]},
    cmdclass={"build_py": BuildPy},
    install_requires=[
        "twisted[tls]>=25.5,<27",  # 26 tested; see msgrelay/twisted_compat.py
        "klein>=23.5",
        "treq>=23.11",
        "cryptography>=41",
        "service-identity>=23.1",
        "zope.interface>=6",
        "click>=8.1",
        "prometheus_client>=0.17",
        "psycopg[binary]>=3.1",
        "psycopg-pool>=3.2",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "pytest-xdist>=3.5",  # pytest.ini runs the suite in parallel worker processes
            "selenium>=4.10",  # the web client's tests, in Debian's chromium
            "hypothesis>=6.100",
            # docs/openapi.yaml: validating the document and the relay's answers, and fuzzing
            "pyyaml>=6",
            "jsonschema>=4.18",
            "openapi-spec-validator>=0.7",
            "schemathesis>=4.0",
        ],
        # Static checks run by .ci/run (mypy.ini, ruff.toml).
        "lint": ["mypy>=1.10", "mypy-zope>=1.0", "ruff>=0.5"],
    },
    entry_points={
        "console_scripts": [
            "msgrelay-client = msgrelay.client.cli:main",
            "msgrelay-admin = msgrelay.admin.cli:main",
        ]
    },
)
