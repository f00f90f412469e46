"""Five JSON schemas for structured-output checks (bench/structured.py, bench/grammar_cost.py): nested objects,
arrays, enums, numbers with bounds, required fields; with one valid example document each."""

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "email": {"type": "string"},
            "address": {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                        "required": ["city", "country"]},
        },
        "required": ["name", "age", "address"],
    },
    "recipe": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "servings": {"type": "integer", "minimum": 1, "maximum": 12},
            "ingredients": {"type": "array", "minItems": 1, "maxItems": 8,
                            "items": {"type": "object", "properties": {"item": {"type": "string"},
                                                                       "grams": {"type": "number", "minimum": 0}},
                                      "required": ["item", "grams"]}},
        },
        "required": ["title", "servings", "ingredients"],
    },
    "review": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
            "score": {"type": "number", "minimum": 0, "maximum": 5},
            "topics": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        },
        "required": ["sentiment", "score"],
    },
    "event": {
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "day": {"type": "integer", "minimum": 1, "maximum": 31},
            "month": {"enum": ["January", "February", "March", "April", "May", "June", "July", "August",
                               "September", "October", "November", "December"]},
            "online": {"type": "boolean"},
        },
        "required": ["title", "day", "month", "online"],
    },
    "inventory": {
        "type": "object",
        "properties": {
            "store": {"type": "string"},
            "items": {"type": "array", "minItems": 1, "maxItems": 5,
                      "items": {"type": "object",
                                "properties": {"sku": {"type": "string"},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 1000},
                                               "price": {"type": "number", "minimum": 0.01, "maximum": 9999}},
                                "required": ["sku", "count", "price"]}},
        },
        "required": ["store", "items"],
    },
}

EXAMPLES = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
               "address": {"city": "London", "country": "United Kingdom"}},
    "recipe": {"title": "Pancakes", "servings": 4, "ingredients": [{"item": "flour", "grams": 250},
                                                                   {"item": "milk", "grams": 500.5},
                                                                   {"item": "eggs", "grams": 120}]},
    "review": {"sentiment": "positive", "score": 4.5, "topics": ["battery life", "screen", "price"]},
    "event": {"title": "Python meetup in Turin", "day": 14, "month": "March", "online": False},
    "inventory": {"store": "Corner Shop #12", "items": [{"sku": "A-1001", "count": 12, "price": 3.99},
                                                        {"sku": "B-2002", "count": 0, "price": 149.0}]},
}
