"""Word lists shipped with the RULER-style generator (no word list can be downloaded here).

`ADJECTIVES` x `NOUNS` give the needles' "adjective-noun" keys (RULER draws them with wonderwords);
`NOUNS` + `ADJECTIVES` + `VERBS` form the pool of the common-words-extraction lists. Every word is
lowercase ASCII and appears once across the three lists.
"""
ADJECTIVES = tuple("""
able angry bitter black blue bold brave bright broad busy calm careful cheap clean clever cold cool
crazy curious dark dear deep dirty dry eager early easy empty fair famous fancy fast fat fierce flat
fresh friendly full funny gentle giant glad golden good grand gray great green happy hard heavy high
honest hot huge humble hungry icy jolly kind large late lazy light little lively lonely long loud low
lucky mad merry mighty modern narrow neat nervous new nice noisy odd old orange pale plain polite poor
proud pure purple quick quiet rapid rare raw red rich rough round royal rude sad safe salty sharp shiny
short shy silent silly simple slim slow small smart smooth soft sour spicy steep stiff strange strict
strong sweet swift tall tame tender thick thin tidy tiny tired tough ugly vast warm weak wet white wide
wild wise witty young yellow zealous
""".split())

NOUNS = tuple("""
apple arrow atlas badge bakery ball banana band basket beach bean bear bell bench berry bicycle bird
blanket boat bone book bottle bowl box bread brick bridge brush bucket button cabin cable cake camera
camp candle canoe canvas carpet carrot castle cat cave chair chalk cheese cherry chest chicken chimney
circle city clock cloud coat coffee coin comet copper corn cottage cotton crayon crown cup curtain
desert desk diamond dinner dog doll dolphin door dragon drum eagle engine falcon farm feather fence
field flag flute forest fork fountain fox frog garden garlic gate ginger glacier glove goat grape
guitar hammer harbor hat helmet hill honey horse island jacket jar jungle kettle key kitchen kite
ladder lake lamp lantern lemon letter lion lizard magnet map marble meadow melon mirror monkey moon
mountain mouse museum needle nest ocean olive onion orchard otter owl paddle palace panda paper parrot
peach pencil pepper piano pillow planet plate pocket pond potato pumpkin puzzle rabbit radio rain river
robot rocket roof rose saddle sailor salad sand scarf school shell ship shoe silver sled snail snake
sock spoon squirrel star statue stone storm sugar sunset table tiger tomato tower train tree tulip
turtle umbrella valley vase violin wagon wallet whale wheel window wolf yacht zebra
""".split())

VERBS = tuple("""
admire answer arrive bake balance borrow breathe build carry catch chase climb collect cook count crawl
dance deliver dig dive draw dream drift explore fetch float fold gather glide grow guard hike
hunt invent jump juggle kneel knit laugh listen march mend melt mix nod obey paint pack plant polish pour
pray pull push question race read repair rescue rest ride roar row rush scrub search sew shout sing sketch
skip sleep slide smile sneeze sort splash spin stack steer stir stretch swim swing talk taste teach
throw travel trust tumble unlock visit wander wash watch wave weave whisper whistle wink wonder write yawn
""".split())
