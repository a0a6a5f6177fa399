-- paygate.html: every value escaped by default, raw() only on purpose.
local html = require "paygate.html"

describe("paygate.html", function()
  it("escapes text and attribute breakers", function()
    local hostile = [[<script>alert("x")</script>' onmouseover=`y` &amp;]]
    local out = tostring(html.render("<p title=\"{{v}}\">{{v}}</p>",
                                     { v = hostile }))
    assert.not_matches("<script>", out, 1, true)
    assert.equal("<p title=\"&lt;script&gt;alert(&quot;x&quot;)&lt;/script"
      .. "&gt;&#39; onmouseover=&#96;y&#96; &amp;amp;\">&lt;script&gt;"
      .. "alert(&quot;x&quot;)&lt;/script&gt;&#39; onmouseover=&#96;y"
      .. "&#96; &amp;amp;</p>", out)
  end)

  it("keeps unquoted-attribute and NUL tricks out", function()
    local out = tostring(html.render("<a href='/x?q={{q}}'>", {
      q = "a' onclick='b\0" }))
    assert.equal("<a href='/x?q=a&#39; onclick=&#39;b\239\191\189'>", out)
  end)

  it("inserts raw() and nested renders as markup, only them", function()
    local inner = html.render("<b>{{x}}</b>", { x = "<i>" })
    local out = tostring(html.render("<div>{{a}}{{b}}</div>",
      { a = inner, b = html.raw("<hr>") }))
    assert.equal("<div><b>&lt;i&gt;</b><hr></div>", out)
  end)

  it("joins lists escaping each plain item", function()
    assert.equal("&lt;a&gt;, <b>", tostring(html.join(
      { "<a>", html.raw("<b>") }, ", ")))
  end)

  it("shows numbers and booleans, refuses other types", function()
    assert.equal("1.5 true", tostring(html.render("{{n}} {{b}}",
                                                  { n = 1.5, b = true })))
    assert.has_error(function() html.render("{{f}}", { f = print }) end)
    assert.has_error(function() html.render("{{missing}}", {}) end)
    assert.equal("", tostring(html.render("{{x}}", { x = html.NONE })))
  end)

  it("looks up dotted names, refuses triple braces", function()
    assert.equal("&lt;", tostring(html.render("{{p.d}}", { p = { d = "<" } })))
    assert.has_error(function() html.render("{{{x}}}", { x = "<" }) end)
    assert.has_error(function() html.raw(nil) end)
  end)

  it("url-encodes and decodes forms", function()
    assert.equal("a%20b%26c%3D%3Cd%3E", html.url_encode("a b&c=<d>"))
    assert.same({ a = "x y", b = "&=", c = "" },
                html.decode_form("a=x+y&b=%26%3D&c"))
    local many = {}
    for i = 1, 150 do many[i] = "k" .. i .. "=v" end
    local t = html.decode_form(table.concat(many, "&"))
    assert.equal("v", t.k100)
    assert.is_nil(t.k101)
  end)
end)
