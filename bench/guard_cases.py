"""The loop guard's corpus, as written: the prompts the bundled model answers, the
hand-written ordinary answers and the constructed degenerate ones. ``bench.guard_corpus``
turns them into ``tests/data/guard_corpus.jsonl``.

Each model answer was read and labelled by hand: an answer is *degenerate* when it stops
making progress, repeating a line, an item or a phrase it has already written over and
over to its end (a list that repeats one item twice and moves on is sloppy, not
degenerate, and stays *ordinary*). ``MODEL_DEGENERATE`` names the degenerate ones (by
entry id) and says what loops; every other model answer is ordinary.
"""

from __future__ import annotations

TEMPERATURES = (0.2, 0.7, 1.0)

# (kind, prompt): lists, steps, code, tables, JSON and prose, the shapes the guard must
# leave alone. Every prompt is answered once at each temperature.
PROMPTS: list[tuple[str, str]] = [
    ("list", "List five fruits."),
    ("list", "Name ten animals that live in the ocean."),
    ("list", "Give me seven tips for studying for an exam."),
    ("list", "List the days of the week."),
    ("list", "What are the primary colours? Answer as a bulleted list."),
    ("list", "List eight countries in Europe and their capitals."),
    ("list", "Give me a shopping list for a pancake breakfast."),
    ("list", "List six programming languages and what each is used for."),
    ("list", "Name five famous scientists and one discovery of each."),
    ("list", "Write a numbered list of ten things to pack for a beach holiday."),
    ("list", "List the planets of the solar system in order."),
    ("list", "Give five reasons to learn a second language."),
    ("list", "List some healthy breakfast ideas."),
    ("list", "What are the benefits of regular exercise? Use bullet points."),
    ("list", "Name six musical instruments."),
    ("steps", "How do I make a cup of tea? Give numbered steps."),
    ("steps", "Explain step by step how to change a flat tyre."),
    ("steps", "What are the steps to plant a tree?"),
    ("steps", "Give me a simple recipe for scrambled eggs, with steps."),
    ("steps", "How do I create a new folder on a computer? List the steps."),
    ("steps", "Describe the steps of the scientific method."),
    ("steps", "How do I set up a Python virtual environment? Numbered steps please."),
    ("steps", "Give step-by-step instructions for washing your hands."),
    ("code", "Write a Python function that reverses a string."),
    ("code", "Write a Python function that checks whether a number is prime."),
    ("code", "Write a JavaScript function that returns the largest number in an array."),
    ("code", "Write a SQL query that selects all users older than 30 from a users table."),
    ("code", "Write a simple HTML page with a title and a paragraph."),
    ("code", "Write a bash script that counts the files in a directory."),
    ("code", "Write a Python class for a bank account with deposit and withdraw methods."),
    ("code", "Write a Python program that prints the numbers from 1 to 10."),
    ("code", "Write a C function that adds two integers."),
    ("code", "Write a Python function to compute the factorial of n."),
    ("code", "Show me how to read a file line by line in Python."),
    ("code", "Write CSS that makes all paragraphs blue."),
    ("table", "Make a markdown table of three countries, their capitals and populations."),
    ("table", "Create a table comparing cats and dogs."),
    ("table", "Make a table of the days of the week with one activity for each."),
    ("table", "Show a markdown table of four fruits and their colours."),
    ("table", "Create a table with the names, ages and cities of three people."),
    ("table", "Make a table of five planets and their distance from the sun."),
    ("json", "Give me a JSON object describing a book."),
    ("json", "Write a JSON array of three users with name and email."),
    ("json", "Give a JSON example of a shopping cart with items and prices."),
    ("json", "Describe a car as JSON."),
    ("json", "Write a JSON config file for a web server."),
    ("json", "Return a JSON list of three cities with their countries."),
    ("prose", "Explain photosynthesis in simple terms."),
    ("prose", "Write a short story about a cat who finds a key."),
    ("prose", "What is the capital of France?"),
    ("prose", "Why is the sky blue?"),
    ("prose", "Write a haiku about the sea."),
    ("prose", "Write a short poem about autumn."),
    ("prose", "Explain what a computer is to a child."),
    ("prose", "Describe your ideal weekend."),
    ("prose", "What is machine learning?"),
    ("prose", "Write an email to a friend inviting them to dinner."),
    ("prose", "Summarise the plot of Romeo and Juliet."),
    ("prose", "How does a rainbow form?"),
    ("prose", "Give me a motivational quote and explain it."),
    ("prose", "Tell me about the history of the bicycle."),
    ("prose", "What should I do if I can't sleep?"),
    ("prose", "Explain the difference between weather and climate."),
    ("prose", "Write a product description for a water bottle."),
    ("prose", "Hello! How are you today?"),
    ("prose", "Write a thank-you note to a teacher."),
    ("prose", "What is the meaning of life?"),
    ("prose", "Describe a busy market in the morning."),
    ("prose", "Explain how a bill becomes a law."),
    ("prose", "Write a limerick about a dog."),
    ("list", "List five things that make people happy."),
    ("list", "What are the four seasons? Describe each in one sentence."),
    ("list", "Give me ten ideas for a rainy day."),
    ("list", "List the ingredients of a pizza margherita."),
    ("list", "Name three famous painters and one painting by each."),
    ("steps", "How do I boil an egg? Numbered steps."),
    ("steps", "Explain how to send an email, step by step."),
    ("steps", "How do I water a house plant properly?"),
    ("code", "Write a Python function that returns the even numbers of a list."),
    ("code", "Write a JavaScript snippet that changes the text of a button when it is clicked."),
    ("code", "Write a Python function that counts the vowels in a word."),
    ("code", "Write a Python loop that prints a multiplication table for 5."),
    ("table", "Make a markdown table of three animals, their habitat and their diet."),
    ("table", "Create a table of four sports and the number of players per team."),
    ("json", "Give a JSON object for a recipe with a name, ingredients and steps."),
    ("json", "Write a JSON object describing a movie."),
    ("prose", "What is gravity?"),
    ("prose", "Write two sentences about the moon."),
    ("prose", "Why do we need sleep?"),
    ("prose", "Describe a dog to someone who has never seen one."),
]

# Prompts that make the bundled model loop, answered greedily (temperature 0): the real
# degenerate answers. Their labels are reviewed like the others.
LOOP_PROMPTS: list[tuple[str, str]] = [
    ("list", "Write a numbered list of 30 facts about cats."),
    ("list", "List 40 words that rhyme with cat."),
    ("list", "Write a numbered list of 25 names for a dog."),
    ("list", "List 30 colours."),
    ("list", "Give me 30 ideas for a birthday party, one per line."),
    ("list", "List 50 animals."),
    ("list", "Write 20 sentences about the sun, numbered."),
    ("list", "List 30 things you can find in a kitchen."),
    ("prose", "What is the capital of France?"),
    ("prose", "Write a haiku about a kiln."),
    ("steps", "List 25 steps to bake bread."),
    ("table", "Make a table of 30 countries and their capitals."),
]

# id -> what loops. Filled in by reading every model answer (see the module docstring).
MODEL_DEGENERATE: dict[str, str] = {
    'model-list-01-t0.2': '"the sea turtle, " over and over to the limit',
    'model-list-03-t0.2': 'the seven days of the week listed again and again (23 items)',
    'model-list-05-t0.7': 'the same few countries renumbered in shuffled order to the limit',
    'model-list-05-t1.0': 'Somalia, Ethiopia and Eritrea shuffled to the limit',
    'model-list-06-t0.2': 'one pancake item renumbered to the limit',
    'model-list-07-t0.2': '"data science, " over and over to the limit',
    'model-list-09-t0.2': '"Beach towel" renumbered to the limit',
    'model-list-09-t0.7': '"Beach towels" renumbered to the limit',
    'model-list-11-t0.2': 'one item renumbered four times, the whole answer after the first',
    'model-list-12-t0.2': '"100g of coconut" to the limit',
    'model-steps-15-t0.2': 'a three-step block repeated to the limit',
    'model-steps-16-t0.2': '"This can be done by driving a flat tyre into a flat tire." ending every step',
    'model-steps-18-t0.7': '"Invert the tuna again" as every other step to the limit',
    'model-steps-18-t1.0': 'one ingredient line repeated inline to the limit',
    'model-steps-20-t0.2': 'one step renumbered to the limit',
    'model-steps-20-t0.7': 'the heading "A Step-by-Step Procedure" and its paragraph renumbered to the limit',
    'model-steps-21-t0.7': 'token soup ("pyc4-pyc4-c1-c1") to the limit',
    'model-code-27-t0.7': 'the same HTML snippet and sentence repeated to the limit',
    'model-code-28-t0.2': 'one comment line to the limit',
    'model-code-32-t0.7': '"multiplying the result of" to the limit',
    'model-json-41-t0.2': 'the same function again and again to the limit',
    'model-json-44-t0.2': 'keys growing by "_model"/"_description" to the limit',
    'model-json-45-t0.2': 'one method/headers block to the limit',
    'model-json-45-t1.0': '"-x-x-x" to the limit',
    'model-table-35-t0.2': 'a three-row block to the limit',
    'model-table-36-t0.2': 'one row to the limit',
    'model-table-36-t0.7': 'two or three colour rows shuffled to the limit',
    'model-table-36-t1.0': '"|" lines to the limit',
    'model-table-37-t0.2': 'the seven days as rows again and again',
    'model-table-38-t0.2': '"Banana | Green/Blue" rows to the limit',
    'model-table-39-t0.2': 'the same five people with other ages to the limit (three were asked for)',
    'model-table-39-t0.7': 'the same five people with other ages to the limit (three were asked for)',
    'model-prose-48-t0.2': 'a two-sentence paragraph repeated to the limit',
    'model-prose-49-t0.2': '"la femme au roi" to the limit',
    'model-prose-49-t1.0': 'a four-line block ("2022 / France / Améron") repeated to the limit',
    'model-prose-52-t0.2': 'a four-line stanza repeated to the limit',
    'model-prose-52-t0.7': '"I am in this moment" to the limit',
    'model-prose-52-t1.0': '"Aunt Agnes\'s gone" and "... gone" lines to the limit',
    'model-prose-53-t0.2': '"a computer is like a person who can play games" to the limit',
    'model-prose-54-t0.2': 'one sentence to the limit',
    'model-prose-57-t0.2': 'one sentence to the limit',
    'model-prose-60-t0.2': 'one sentence to the limit',
    'model-prose-60-t0.7': '"the first bicycle to use horse hooves on wheels" to the limit',
    'model-prose-65-t0.2': '"P.S. I hope you find a way ..." to the limit',
    'model-prose-65-t0.7': '"Teen" lines to the limit',
    'model-prose-68-t0.2': 'one sentence to the limit',
    'model-prose-69-t0.2': '"a dog with a heart full of laughter" three times: the whole answer',
    'model-list-72-t0.2': 'the first idea renumbered to the limit',
    'model-list-73-t0.2': '"Margherita pizza toppings: ..." to the limit',
    'model-code-81-t1.0': '",000" fifteen times, then counting to the limit',
    'model-table-82-t0.2': 'one row to the limit',
    'model-table-82-t0.7': 'a six-row block to the limit',
    'model-json-84-t0.2': 'one key to the limit',
    'model-json-85-t0.2': 'one key to the limit',
    'model-prose-89-t0.2': '"a mix of" to the limit',
    'loop-list-00': "item 8 renumbered to the limit (the test's looping list)",
    'loop-list-01': '"Cat, " to the limit',
    'loop-list-02': '"Bella" renumbered to the limit',
    'loop-list-03': '"Grey" renumbered 20 times',
    'loop-list-04': 'the first item renumbered to the limit',
    'loop-list-05': 'one animal renumbered to the limit',
    'loop-list-07': '"Toaster" renumbered 28 times',
    'loop-prose-08': '"la femme au roi" to the limit',
    'loop-prose-09': '"a place where" clauses, then the whole paragraph again',
    'loop-steps-10': 'one step renumbered to the limit',
    'loop-table-11': 'a three-row block to the limit',
}

# Hand-written ordinary answers: lists, code, tables and JSON with the structure that
# repeats by nature (closing braces, table rows, repeated keys, similar items).
HAND_ORDINARY: list[tuple[str, str]] = [
    ("code", '''Here is a Python module with a few helpers:

```python
def total(items):
    result = 0
    for item in items:
        result += item.price
    return result


def names(items):
    result = []
    for item in items:
        result.append(item.name)
    return result


def cheapest(items):
    result = None
    for item in items:
        if result is None or item.price < result.price:
            result = item
    return result
```

Each function walks the list once and returns `result`.'''),
    ("code", '''```javascript
function render(tree) {
  if (tree.children) {
    for (const child of tree.children) {
      if (child.visible) {
        draw(child);
      }
    }
  }
}

function draw(node) {
  if (node.kind === "box") {
    ctx.strokeRect(node.x, node.y, node.w, node.h);
  } else {
    ctx.fillText(node.text, node.x, node.y);
  }
}
```'''),
    ("code", '''A tic-tac-toe board in HTML:

```html
<div class="board">
  <div class="cell"></div>
  <div class="cell"></div>
  <div class="cell"></div>
  <div class="cell"></div>
  <div class="cell"></div>
  <div class="cell"></div>
  <div class="cell"></div>
  <div class="cell"></div>
  <div class="cell"></div>
</div>
```

The CSS grid lays the nine cells out in three rows.'''),
    ("code", '''```html
<table>
  <tr>
    <td></td>
    <td></td>
    <td></td>
  </tr>
  <tr>
    <td></td>
    <td></td>
    <td></td>
  </tr>
  <tr>
    <td></td>
    <td></td>
    <td></td>
  </tr>
</table>
```'''),
    ("json", '''```json
[
  {
    "id": 1,
    "title": "Buy milk",
    "done": false
  },
  {
    "id": 2,
    "title": "Walk the dog",
    "done": false
  },
  {
    "id": 3,
    "title": "Write the report",
    "done": false
  },
  {
    "id": 4,
    "title": "Call the bank",
    "done": true
  }
]
```'''),
    ("json", '''{
  "server": {
    "host": "0.0.0.0",
    "port": 8080,
    "tls": {
      "enabled": false
    }
  },
  "logging": {
    "level": "info",
    "file": {
      "enabled": false
    }
  },
  "cache": {
    "enabled": true,
    "ttl": 300
  }
}'''),
    ("json", '''Here is the matrix as JSON:

{"grid": [
  [0, 0, 0, 0, 0],
  [0, 0, 0, 0, 0],
  [0, 0, 0, 0, 0],
  [0, 0, 0, 0, 0],
  [0, 0, 0, 0, 0]
]}'''),
    ("table", '''| Day | Opening hours |
| --- | --- |
| Monday | 9:00 - 17:00 |
| Tuesday | 9:00 - 17:00 |
| Wednesday | 9:00 - 17:00 |
| Thursday | 9:00 - 17:00 |
| Friday | 9:00 - 15:00 |
| Saturday | Closed |
| Sunday | Closed |'''),
    ("table", '''| Feature | Basic | Pro | Enterprise |
|---|---|---|---|
| Users | 1 | 10 | Unlimited |
| Storage | 10 GB | 100 GB | 1 TB |
| Support | Email | Email | Phone |
| SSO | No | No | Yes |
| Audit log | No | Yes | Yes |
| Custom domain | No | Yes | Yes |'''),
    ("table", '''| A | B | A AND B |
|:-:|:-:|:-:|
| false | false | false |
| false | true | false |
| true | false | false |
| true | true | true |'''),
    ("list", '''A week of training:

- Monday: Run 5 km
- Tuesday: Rest
- Wednesday: Swim 1 km
- Thursday: Rest
- Friday: Run 8 km
- Saturday: Rest
- Sunday: Rest'''),
    ("list", '''Day 1: Travel to Rome
Day 2: The Colosseum and the Forum
Day 3: The Vatican Museums
Day 4: Free day
Day 5: Free day
Day 6: Free day
Day 7: Fly home'''),
    ("list", '''Answer key:

1. True
2. True
3. False
4. True
5. True
6. True
7. True
8. False
9. True
10. False'''),
    ("list", '''The times table of 7:

7 x 1 = 7
7 x 2 = 14
7 x 3 = 21
7 x 4 = 28
7 x 5 = 35
7 x 6 = 42
7 x 7 = 49
7 x 8 = 56
7 x 9 = 63
7 x 10 = 70'''),
    ("list", '''Primary colours:

1. **Red**: the colour of fire and of ripe strawberries.
2. **Blue**: the colour of the sky and of the deep sea.
3. **Yellow**: the colour of the sun and of lemons.

Mixing any two of them gives a secondary colour.'''),
    ("list", '''Shopping list for pancakes:

- 2 cups of flour
- 2 eggs
- 1 cup of milk
- 1 tablespoon of sugar
- 1 teaspoon of baking powder
- a pinch of salt
- butter for the pan
- maple syrup'''),
    ("list", '''Packing checklist:

- [ ] Passport
- [ ] Tickets
- [ ] Phone charger
- [x] Sunscreen
- [x] Swimsuit
- [ ] Towel
- [ ] Book'''),
    ("steps", '''How to make tea:

1. Boil water.
   - Time: about 3 minutes
2. Warm the pot.
   - Time: about 1 minute
3. Add the tea leaves.
   - Time: a few seconds
4. Pour the water over the leaves.
   - Time: a few seconds
5. Let it steep.
   - Time: 3 to 5 minutes'''),
    ("prose", '''Row, row, row your boat,
Gently down the stream.
Merrily, merrily, merrily, merrily,
Life is but a dream.

Row, row, row your boat,
Gently down the stream.
Merrily, merrily, merrily, merrily,
Life is but a dream.'''),
    ("prose", '''The wind came over the hill,
and the grass bent low.
I waited by the gate.

The rain came over the hill,
and the river rose.
I waited by the gate.

The night came over the hill,
and the lamps were lit.
I waited by the gate.'''),
    ("code", '''```sql
CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, age INTEGER);
INSERT INTO users (name, age) VALUES ('Ada', 36);
INSERT INTO users (name, age) VALUES ('Alan', 41);
INSERT INTO users (name, age) VALUES ('Grace', 85);
INSERT INTO users (name, age) VALUES ('Edsger', 72);
SELECT name FROM users WHERE age > 30 ORDER BY age;
```'''),
    ("code", '''```yaml
services:
  web:
    image: nginx:latest
    restart: always
    ports:
      - "80:80"
  api:
    image: example/api:1.2
    restart: always
    ports:
      - "8000:8000"
  db:
    image: postgres:16
    restart: always
```'''),
    ("code", '''```bash
#!/bin/sh
echo "=========="
echo "Files"
echo "=========="
ls -1 | wc -l
echo "=========="
echo "Directories"
echo "=========="
find . -maxdepth 1 -type d | wc -l
```'''),
    ("code", '''```c
switch (op) {
    case '+':
        result = a + b;
        break;
    case '-':
        result = a - b;
        break;
    case '*':
        result = a * b;
        break;
    case '/':
        result = a / b;
        break;
    default:
        result = 0;
        break;
}
```'''),
    ("code", '''```go
func load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var c Config
	if err := json.Unmarshal(data, &c); err != nil {
		return nil, err
	}
	if err := c.Validate(); err != nil {
		return nil, err
	}
	return &c, nil
}
```'''),
    ("code", '''```python
import unittest


class TestAdd(unittest.TestCase):
    def test_small(self):
        self.assertEqual(add(1, 2), 3)

    def test_zero(self):
        self.assertEqual(add(0, 0), 0)

    def test_negative(self):
        self.assertEqual(add(-1, -2), -3)


if __name__ == "__main__":
    unittest.main()
```'''),
    ("code", '''```python
board = [
    [".", ".", ".", ".", ".", ".", ".", "."],
    [".", ".", ".", ".", ".", ".", ".", "."],
    [".", ".", ".", ".", ".", ".", ".", "."],
    [".", ".", ".", ".", ".", ".", ".", "."],
    [".", ".", ".", ".", ".", ".", ".", "."],
    [".", ".", ".", ".", ".", ".", ".", "."],
    [".", ".", ".", ".", ".", ".", ".", "."],
    [".", ".", ".", ".", ".", ".", ".", "."],
]
```'''),
    ("code", '''Two ways to print a separator:

```python
print()
print()
print("-" * 40)
print()
print()
```

```python
print("\\n\\n" + "-" * 40 + "\\n\\n")
```'''),
    ("code", '''```rust
fn describe(n: i32) -> &'static str {
    match n {
        0 => "zero",
        1 => "one",
        2 => "two",
        _ => "many",
    }
}
```'''),
    ("table", '''name,city,country
Ada,London,UK
Alan,London,UK
Grace,New York,USA
Linus,Helsinki,Finland
Margaret,Boston,USA'''),
    ("list", '''Frequently asked questions

Q: Can I cancel at any time?
A: Yes.

Q: Is there a free trial?
A: Yes.

Q: Do you ship abroad?
A: Yes.

Q: Can I pay by cheque?
A: No.'''),
    ("prose", '''Photosynthesis is how plants make food. They take in carbon dioxide from the air and
water from the soil, and with the energy of sunlight they turn them into sugar and oxygen.
The sugar feeds the plant; the oxygen goes back into the air. It happens in the leaves, in
tiny parts called chloroplasts, which hold a green pigment, chlorophyll. That pigment is
why leaves are green.'''),
    ("list", '''Plural forms:

- cat: cats
- dog: dogs
- mouse: mice
- sheep: sheep
- fish: fish
- deer: deer
- child: children'''),
    ("code", '''```css
p {
  color: blue;
}

h1 {
  color: blue;
}

a {
  color: blue;
}

a:hover {
  color: navy;
}
```'''),
    ("code", '''```python
def fizzbuzz(n):
    for i in range(1, n + 1):
        if i % 15 == 0:
            print("FizzBuzz")
        elif i % 3 == 0:
            print("Fizz")
        elif i % 5 == 0:
            print("Buzz")
        else:
            print(i)
```

Output for n = 5:

```
1
2
Fizz
4
Buzz
```'''),
    ("json", '''{"colors": ["red", "green", "blue"], "sizes": ["S", "M", "L", "XL"], "in_stock": true,
 "variants": [{"color": "red", "size": "S"}, {"color": "red", "size": "M"}, {"color": "red", "size": "L"}]}'''),
    ("table", '''| # | Task | Owner | Status |
|---|---|---|---|
| 1 | Design | Ana | Done |
| 2 | Backend | Ben | In progress |
| 3 | Frontend | Ana | In progress |
| 4 | Tests | Cleo | Not started |
| 5 | Docs | Ben | Not started |'''),
    ("list", '''Greetings around the world:

1. Hello (English)
2. Hola (Spanish)
3. Bonjour (French)
4. Hallo (German)
5. Ciao (Italian)
6. Olá (Portuguese)
7. Hej (Swedish)'''),
]


def _numbered(item: str, n: int, fmt: str = "{i}. {item}", start: int = 1, sep: str = "\n") -> str:
    return sep.join(fmt.format(i=i, item=item) for i in range(start, start + n))


def _cycle(items: list[str], n: int, fmt: str = "{i}. {item}") -> str:
    return "\n".join(fmt.format(i=i + 1, item=items[i % len(items)]) for i in range(n))


# Constructed degenerate answers: the loop of kiln's story (one item renumbered), its
# bullet, case, emphasis, whitespace and punctuation variants, blocks of lines, inline
# lists, tables, JSON and code. Each runs on as a loop does, to about the token limit.
CONSTRUCTED_DEGENERATE: list[tuple[str, str]] = [
    ("list", _numbered("The cat.", 40)),
    ("list", "Here are some facts about cats:\n\n" + _numbered("The cat.", 40)),
    ("list", _numbered("The cat.", 40, sep=" ")),  # "1. The cat. 2. The cat. 3. The cat."
    ("list", "Sure! " + _numbered("The cat sat on the mat", 30, fmt="{i}) {item},", sep=" ")),
    ("list", _numbered("Cats are known for their love of music and their ability to play musical instruments.", 12)),
    ("list", "Names for a dog:\n1. Max\n2. Bella\n3. Charlie\n" + _numbered("Max", 40, start=4)),
    ("list", _numbered("The cat", 40, fmt="- {item}")),
    ("list", "\n".join(("- ", "* ", "• ", "+ ")[i % 4] + "The cat is on the mat." for i in range(40))),
    ("list", "\n".join(("The Cat", "the cat", "THE CAT", "The cat.")[i % 4] for i in range(40))),
    ("list", "\n".join(("  The   cat  ", "\tThe cat", "The cat   ", "   the  cat")[i % 4] for i in range(40))),
    ("list", _numbered("**The cat**: a small furry animal.", 30)),
    ("list", "\n".join(f"{i}. {('**The cat**', '*The cat*', '_the cat_', 'The cat')[i % 4]}" for i in range(1, 41))),
    ("list", "\n".join(f"{i}. The cat{('.', '!', '', ';')[i % 4]}" for i in range(1, 41))),
    ("list", _numbered("The cat is a small animal.", 30, fmt="{i}.\n{item}\n")),
    ("list", "\n".join(f"{chr(97 + i % 26)}) The dog runs in the park" for i in range(30))),
    ("list", "\n".join(f"{'i ii iii iv v vi vii viii ix x'.split()[i % 10]}. The dog runs fast" for i in range(30))),
    ("list", _cycle(["Red: the colour of fire.", "Blue: the colour of the sky."], 40)),
    ("list", _cycle(["Apples are red.", "Bananas are yellow.", "Grapes are purple."], 40)),
    ("list", "\n".join(f"{i}. **Lemon**\n   A sour yellow fruit." for i in range(1, 30))),
    ("steps", _numbered("Mix the flour and the water.", 30, fmt="Step {i}: {item}")),
    ("steps", "To bake bread:\n" + _numbered("Knead the dough for ten minutes.", 30, fmt="{i}. {item}")),
    ("list", "## Tips\n\n" + "\n\n".join(f"### {i}. Drink water\nDrink a glass of water every morning."
                                        for i in range(1, 20))),
    ("list", "> " + "\n> ".join(f"{i}. The sun is a star." for i in range(1, 40))),
    ("table", "| # | Country | Capital |\n|---|---|---|\n"
              + "\n".join(f"| {i} | France | Paris |" for i in range(1, 40))),
    ("table", "| Country | Capital |\n| --- | --- |\n" + "\n".join("| France | Paris |" for _ in range(40))),
    ("json", "[\n" + ",\n".join('  {"name": "John", "age": 30}' for _ in range(30)) + "\n]"),
    ("json", '{"cities": [\n' + ",\n".join('  {\n    "city": "Paris",\n    "country": "France"\n  }'
                                           for _ in range(20)) + "\n]}"),
    ("code", "```python\n" + "\n".join('print("The quick brown fox jumps over the lazy dog and the cat")'
                                       for _ in range(30)) + "\n```"),
    ("code", "```python\n" + "\n\n".join("def add(a, b):\n    result = a + b\n    return result"
                                         for _ in range(20)) + "\n```"),
    ("prose", "\n".join("The cat is a small animal that lives with people and likes to sleep in the sun all day long."
                        for _ in range(12))),
    ("prose", "\n\n".join("I love my cat. My cat is very cute. I love my cat very much." for _ in range(20))),
    ("list", "Words that rhyme with cat:\n" + "\n".join(f"{i}. Cat" for i in range(1, 60))),
]
