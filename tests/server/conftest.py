"""Shared fixtures: the server under test is started by run.sh, which passes its address and
API key in MOEFLUX_BASE_URL and MOEFLUX_API_KEY."""
import os

import anthropic
import openai
import pytest


@pytest.fixture(scope="session")
def base_url():
    url = os.environ.get("MOEFLUX_BASE_URL")
    if not url:
        pytest.exit("MOEFLUX_BASE_URL is not set: run tests/server/run.sh", returncode=2)
    return url.rstrip("/")


@pytest.fixture(scope="session")
def api_key():
    return os.environ.get("MOEFLUX_API_KEY", "none")


@pytest.fixture(scope="session")
def model():
    return os.environ.get("MOEFLUX_MODEL", "bundled")


@pytest.fixture(scope="session")
def oai(base_url, api_key):
    return openai.OpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def claude(base_url, api_key):
    # The Anthropic SDK appends /v1/messages itself.
    return anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)
