"""The web console in a real browser (Debian's Chromium, driven by Playwright), on the live stack.

A new client signs in with its key, plays a Telegram user on the sandbox phone (Start, share the
number), sends a test message from the dashboard and sees it arrive in the phone; sends a code
through the Telegram Gateway to a person with no bot and reads it in "Verification Codes"; starts a
verification and checks it with the code read from the phone; a bad policy value shows the API's
error next to its field. An operator sees the fraud guard's events and allows a prefix from one.
Then the same console at 375 px wide, signed in with the keyboard only.
Screenshots of every step go to tests/artifacts/console/ (git-ignored).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, ConsoleMessage, Locator, Page, async_playwright, expect

from services.core.devdb import ROOT
from tests.e2e.conftest import System

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "tests" / "artifacts" / "console"
# What works here as root with no network: no sandbox, no GPU, nothing phoned home.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PHONE = "+79995550123"
GATEWAY_PHONE = "+79995550456"
CODE = re.compile(r"(\d{6}) is your verification code")
TIMEOUT = 15_000


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (once, before the browser starts)
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield launched
        await launched.close()


def _watch(page: Page) -> list[str]:
    """Script errors and console errors (a CSP violation is one) the page reports; not the
    browser's own note on an HTTP error status, which the console shows as a refusal."""
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(message.text)

    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", console)
    return problems


async def _shot(page: Page, name: str) -> None:
    await page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def _nav(page: Page, name: str) -> Locator:
    return page.get_by_role("navigation", name="Console sections").get_by_role("link", name=name, exact=True)


async def _open_chat(page: Page, person: str) -> None:
    await _nav(page, "Sandbox phone").click()
    await page.get_by_role("button", name=re.compile(person)).click()
    await page.get_by_role("button", name=re.compile("@smscodes_bot")).click()


async def test_console_first_message_first_verification_and_policy(system: System, browser: Browser) -> None:
    created = system.cli(
        "clients",
        "create",
        "Console Shop",
        *[f"--scope={s}" for s in ("messages:send", "messages:read", "verify", "admin")],
    )
    key = str(created["key"])
    async with aiohttp.ClientSession() as http, http.get(f"{system.http}/console/") as reply:
        assert reply.status == 200
        csp = reply.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp and "'unsafe-inline'" not in csp

    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT)
    problems = _watch(page)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))

    # 1. Sign in with the key.
    await page.goto(f"{system.http}/console/")
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_text("Console Shop")).to_be_visible()
    await _shot(page, "01-signed-in")

    # 2. The sandbox phone: a person, Start, share the number.
    await _nav(page, "Sandbox phone").click()
    await page.get_by_label("First name").fill("Alice")
    await page.get_by_label("Their phone number").fill(PHONE)
    await page.get_by_role("button", name="Create person").click()
    await page.get_by_role("button", name=re.compile("@smscodes_bot")).click()
    await page.get_by_role("button", name="Start", exact=True).click()
    share = page.get_by_role("button", name=re.compile("Share my phone number"))
    await expect(share).to_be_visible()
    await _shot(page, "02-phone-started")
    await share.click()
    await expect(page.locator(".bubble.bot", has_text="Codes for +7******0123 will come to this chat")).to_be_visible()
    await expect(share).to_be_hidden()
    await _shot(page, "03-phone-connected")

    # 3. A test message from the dashboard arrives in the phone.
    await _nav(page, "Send a test").click()
    form = page.locator("form", has=page.get_by_role("heading", name="Send a test message"))
    await form.get_by_label("Phone number").fill(PHONE)
    await form.get_by_label("Text").fill("Your code is 7342")
    await form.get_by_role("button", name="Send message").click()
    await expect(form.get_by_role("status")).to_contain_text("Accepted")
    await _shot(page, "04-message-sent")
    await _open_chat(page, "Alice")
    await expect(page.locator(".bubble.bot", has_text="Your code is 7342")).to_be_visible()
    await _shot(page, "05-message-in-phone")

    # 3b. A code through the Telegram Gateway to someone with no bot: it lands in Telegram's
    # "Verification Codes" chat, and opening the chat makes the message read.
    await _nav(page, "Sandbox phone").click()
    await page.get_by_label("First name").fill("Bob")
    await page.get_by_label("Their phone number").fill(GATEWAY_PHONE)
    await page.get_by_role("button", name="Create person").click()
    await _nav(page, "Send a test").click()
    form = page.locator("form", has=page.get_by_role("heading", name="Send a test message"))
    await form.get_by_label("Phone number").fill(GATEWAY_PHONE)
    await form.get_by_label("Text").fill("Your code is 5173")
    await form.get_by_label("The code in it").fill("5173")
    await form.get_by_label("Channel").select_option("CHANNEL_TELEGRAM_GATEWAY")
    await form.get_by_role("button", name="Send message").click()
    await expect(form.get_by_role("status")).to_contain_text("delivered")
    gateway_message = await form.get_by_role("link", name=re.compile("message ")).get_attribute("href")
    await _nav(page, "Sandbox phone").click()
    await page.get_by_role("button", name=re.compile("Bob")).click()
    codes = page.get_by_role("button", name=re.compile("Verification Codes"))
    await expect(codes).to_contain_text("1 unread")
    await codes.click()
    await expect(page.locator(".bubble.bot", has_text="5173 is your verification code")).to_be_visible()
    await expect(page.locator(".bubble.bot small")).to_contain_text("read")
    await _shot(page, "05b-gateway-code-read")
    # The Gateway's "read" report reaches delivery through the edge within moments; the message is
    # read again (its Refresh button, as a person would) until it shows. Going away and back instead
    # can leave the page on the message it shows, unfetched, when the two route changes meet.
    await page.goto(f"{system.http}/console/{gateway_message}")
    timeline = page.locator(".timeline")
    await expect(timeline).to_be_visible()
    for _ in range(40):
        if "Read" in await timeline.inner_text():
            break
        await page.get_by_role("button", name="Refresh").click()
        await page.wait_for_timeout(250)
    await expect(timeline).to_contain_text("Read")
    await expect(timeline).to_contain_text("Sent by telegram gateway")

    # 4. A verification, checked with the code read from the phone.
    await _nav(page, "Send a test").click()
    form = page.locator("form", has=page.get_by_role("heading", name="Start a test verification"))
    await form.get_by_label("Phone number").fill(PHONE)
    await form.get_by_label("Channel").select_option("CHANNEL_TELEGRAM")
    await form.get_by_role("button", name="Start verification").click()
    link = form.get_by_role("link", name=re.compile("Open verification"))
    await expect(link).to_be_visible()
    verification_url = await link.get_attribute("href")
    await _open_chat(page, "Alice")
    bubble = page.locator(".bubble.bot", has_text="is your verification code")
    await expect(bubble).to_be_visible()
    found = CODE.search(await bubble.inner_text())
    assert found, await bubble.inner_text()
    await _shot(page, "06-code-in-phone")
    await page.goto(f"{system.http}/console/{verification_url}")
    await page.get_by_label("Code the person received").fill(found.group(1))
    await page.get_by_role("button", name="Check code").click()
    await expect(page.get_by_role("status")).to_contain_text("Approved")
    await expect(page.locator(".timeline")).to_contain_text("Approved")
    await _shot(page, "07-verification-approved")

    # The lists show both, with their timelines a click away.
    await _nav(page, "Verifications").click()
    await page.get_by_label("Status").select_option("APPROVED")
    await expect(page.locator(".rows li")).to_have_count(1)
    await _nav(page, "Messages").click()
    await expect(page.locator(".rows li")).to_have_count(3)
    await page.locator(".rows a").last.click()
    await expect(page.locator(".timeline")).to_contain_text("Sent by telegram")
    await _shot(page, "08-message-timeline")

    # 5. A bad policy value: the API's error next to its field, nothing saved.
    await _nav(page, "Policy").click()
    await page.get_by_label("Daily SMS cap").fill("-1")
    await page.get_by_role("button", name="Save policy").click()
    field_error = page.locator("#policy-daily_sms_cap-error")
    await expect(field_error).to_have_text("must be >= 0")
    await expect(page.get_by_label("Daily SMS cap")).to_have_attribute("aria-invalid", "true")
    await _shot(page, "09-policy-error")
    await page.get_by_label("Daily SMS cap").fill("50")
    await page.get_by_role("button", name="Save policy").click()
    await expect(page.get_by_role("status")).to_contain_text("Saved")
    await expect(field_error).to_have_count(0)

    # The usage chart counts what was sent.
    await _nav(page, "Usage").click()
    await expect(page.locator("table tbody tr")).to_have_count(1)
    await expect(page.locator("table tbody td").first).to_have_text("2")
    await _shot(page, "10-usage")

    # Nothing left the edge's origin, the key never appeared in a URL, the page had no errors.
    origin = system.http
    assert all(url.startswith(origin) for url in requests), [u for u in requests if not u.startswith(origin)]
    assert not any(key in url for url in requests)
    assert await page.evaluate("() => localStorage.length") == 0
    assert problems == []
    await context.close()


async def _send_sms(http: aiohttp.ClientSession, system: System, key: str, phone: str, ip: str) -> tuple[int, str]:
    """One SMS as a client's backend asks for it: (HTTP status, ErrorInfo reason or "")."""
    body = {"phone": phone, "text": "Your code is 5521", "channel": "CHANNEL_SMS", "endUserIp": ip}
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(f"{system.http}/v1/messages", json=body, headers=headers) as reply:
        answer = await reply.json()
        reasons = [d["reason"] for d in answer.get("details", []) if d.get("@type", "").endswith("ErrorInfo")]
        return reply.status, (reasons or [""])[0]


async def test_console_fraud_guard_events_and_prefix_rules(system: System, browser: Browser) -> None:
    created = system.cli("clients", "create", "Fraud Desk", "--scope=messages:send", "--scope=admin")
    key = str(created["key"])
    async with aiohttp.ClientSession() as http:
        # Cold start: one number of a fresh prefix goes out; a second one, its code not entered yet,
        # needs a CAPTCHA (the request could show one): a guard event for the prefix.
        assert await _send_sms(http, system, key, "+4915112340001", "198.51.100.7") == (200, "")
        assert await _send_sms(http, system, key, "+4915112347777", "198.51.100.8") == (412, "CAPTCHA_REQUIRED")

        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT)
        problems = _watch(page)
        await page.goto(f"{system.http}/console/")
        await page.get_by_label("API key").fill(key)
        await page.get_by_role("button", name="Sign in").click()
        await _nav(page, "Fraud guard").click()

        # The event: the range, what the guard did, the signal that decided and its counts.
        row = page.locator("tbody tr", has=page.locator("th .mono", has_text=re.compile(r"^\+491511234$")))
        await expect(row).to_have_count(1)
        await expect(row).to_contain_text("CAPTCHA asked")
        await expect(row).to_contain_text("PREFIX_VELOCITY")
        await expect(row.locator("td").nth(2)).to_have_text(re.compile(r"^[1-9]\d* / 1 / 0$"))
        await page.get_by_label("Only events last seen for Fraud Desk").check()
        await expect(row).to_have_count(1)
        await _shot(page, "fraud-01-events")

        # A rule from the event: its prefix filled in; without a reason nothing is saved.
        await row.get_by_role("button", name="Set a rule for +491511234").click()
        await expect(page.get_by_label("Prefix", exact=True)).to_have_value("+491511234")
        await expect(page.get_by_label("Why")).to_be_focused()
        await page.get_by_role("button", name="Save rule").click()
        await expect(page.locator("#rule-reason-error")).to_contain_text("printable characters")
        await expect(page.get_by_text("No rules: the guard decides alone.")).to_be_visible()
        await page.get_by_label("Why").fill("our staff's test numbers")
        await page.get_by_label("Only for Fraud Desk").check()
        await page.get_by_role("button", name="Save rule").click()
        await expect(page.get_by_role("status")).to_contain_text("+491511234 is always allowed for this client")
        rules = page.get_by_role("list", name="Prefix rules")
        await expect(rules.locator("li")).to_have_count(1)
        await expect(rules).to_contain_text("our staff's test numbers")
        await _shot(page, "fraud-02-rule")

        # The safe list lets the number through; removed, the guard scores it again.
        assert await _send_sms(http, system, key, "+4915112347777", "198.51.100.8") == (200, "")
        await page.get_by_role("button", name="Remove the rule for +491511234").click()
        await expect(page.get_by_role("status")).to_contain_text("The rule for +491511234 is removed")
        await expect(page.get_by_text("No rules: the guard decides alone.")).to_be_visible()
        assert await _send_sms(http, system, key, "+4915112349999", "198.51.100.9") == (412, "CAPTCHA_REQUIRED")
        assert problems == []
        await context.close()


async def test_console_at_375_px_with_the_keyboard(system: System, browser: Browser) -> None:
    created = system.cli("clients", "create", "Narrow Shop")
    context = await browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT)
    problems = _watch(page)
    await page.goto(f"{system.http}/console/")
    # Keyboard only: Tab reaches the key field, Enter signs in.
    for _ in range(5):
        await page.keyboard.press("Tab")
        if await page.evaluate("() => document.activeElement?.id") == "api-key":
            break
    assert await page.evaluate("() => document.activeElement?.id") == "api-key"
    await page.keyboard.type(str(created["key"]))
    await page.keyboard.press("Enter")
    await expect(page.get_by_text("Narrow Shop")).to_be_visible()
    for view in ("messages", "test", "phone", "usage", "policy", "fraud"):
        await page.goto(f"{system.http}/console/#/{view}")
        await expect(page.locator("main h1")).to_be_visible()
        width = await page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 375, f"{view} is {width} px wide at a 375 px screen"
        await _shot(page, f"narrow-{view}")
    # Without an admin key the policy says what is needed instead of failing.
    await expect(page.get_by_text("needs an API key with the admin scope")).to_be_visible()
    # Focus is visible: the focused link has an outline.
    await page.keyboard.press("Tab")
    outline = await page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"
    assert problems == []
    await context.close()
