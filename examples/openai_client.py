"""Query a running `sqplus serve` / vLLM OpenAI server with the openai client.

    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1
"""
import argparse

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="served model name (default: the first one listed)")
    args = ap.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="EMPTY")  # vLLM checks no key unless --api-key is set
    model = args.model or client.models.list().data[0].id
    comp = client.completions.create(model=model, prompt="def is_prime(n):\n", max_tokens=64, temperature=0)
    print("completion:", comp.choices[0].text)
    chat = client.chat.completions.create(
        model=model, temperature=0, max_tokens=96,
        messages=[{"role": "user", "content": "Write a one-line Python expression that sums a list xs."}])
    print("chat:", chat.choices[0].message.content)


if __name__ == "__main__":
    main()
