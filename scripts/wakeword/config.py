"""Every constant of the "hey marvin" recipe, in one place.

The stage geometry (windows, hops, prefills, pads) must match what the server's stream
declaration in models/models.toml does; the seeds, voice and text lists, data sizes,
augmentation ranges and head hyper-parameters decide the trained head bit for bit, and
RECORD.md quotes them. Change one and the committed models and fixtures must be rebuilt.
Also the two helpers every part uses (log, sha256).
"""
import hashlib
from pathlib import Path

SR = 16000

# --- the stages (see the docstring of scripts/make_wakeword.py) ---
MEL_WINDOW, MEL_HOP, MEL_PREFILL, MEL_PAD, MEL_FRAMES, N_MELS = 1760, 1280, 480, 0.0, 8, 32
EMB_WINDOW, EMB_HOP, EMB_PREFILL, EMB_PAD, EMB_DIM = 76, 8, 68, 1.0, 96
KW_WINDOW, KW_HOP, KW_PREFILL = 16, 1, 0
THRESHOLD, REFRACTORY_S = 0.5, 1.0
PHRASE = "hey marvin"

LIVEKIT_VERSION = "0.3.0"
LIVEKIT_SHA256 = {
    "melspectrogram.onnx": "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
    "embedding_model.onnx": "70d164290c1d095d1d4ee149bc5e00543250a7316b59f31d056cff7bd3075c1f",
}

# --- seeds (numpy PCG64) ---
SEED_TRAIN_POS = 20260401
SEED_TRAIN_NEG = 20260402
SEED_EVAL_POS = 20260403
SEED_EVAL_NEG = 20260404
SEED_INIT = 20260405      # head weights
SEED_SGD = 20260406       # minibatch order
SEED_FIXTURE = 20260407   # fixture noise
SEED_TRAIN_PAIRS = 20260408  # confusable twins of the training positives
SEED_EVAL_CONF = 20260409    # held-out confusable streams

# --- the data recipe ---
N_TRAIN_POS = 800          # positive clips
N_TRAIN_NEG_STREAMS = 80   # ~30 s streams of other speech
N_TRAIN_NOISE_STREAMS = 12  # 20 s of silence / noise only
N_EVAL_POS = 200
N_EVAL_NEG_STREAMS = 36    # ~30 s of held-out sentences (no confusable-only utterances)
N_EVAL_NOISE_STREAMS = 3
N_EVAL_CONF_STREAMS = 16   # ~30 s of held-out confusables only
NEG_STREAM_S = 30.0
NOISE_STREAM_S = 20.0
SPEEDS = (120, 220)        # words per minute, inclusive, uniform integers
PITCHES = (20, 80)         # espeak-ng pitch 0-99, inclusive, uniform integers
GAIN_DB = (-20.0, -1.0)    # speech peak level, dBFS, uniform
AUG_PITCH_P, AUG_PITCH_CENTS = 0.7, 400.0  # training only: sox pitch shift, uniform +-cents
AUG_EQ_P, AUG_EQ_DB = 0.5, 8.0             # sox equalizer at 300-3000 Hz, Q 1, uniform +-dB
AUG_REVERB_P = 0.25                        # sox reverb, reverberance 10-60%
NOISE_DB = (-90.0, -45.0)  # white background noise rms, dBFS, uniform; 10% of clips have none

# Voices are base voice + variant. Held-out voices share neither with training.
TRAIN_BASES = ["en", "en-us", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-us-nyc"]
TRAIN_VARIANTS = ["", "m1", "m2", "m3", "m4", "m5", "f1", "f2", "f3", "klatt", "klatt3",
                  "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Denis", "Diogo", "Gene",
                  "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Mike", "Nguyen",
                  "RicishayMax", "adam", "anika", "antonio", "benjamin", "boris", "caleb", "david", "ed",
                  "grandma", "grandpa", "gustave", "john", "kaukovalta", "linda", "marcelo", "max",
                  "michel", "miguel", "pablo", "paul", "pedro", "rob", "robert", "sandro", "steph",
                  "steph2", "steph3", "travis", "zac"]
EVAL_BASES = ["en-gb-scotland", "en-gb-x-gbcwmd"]
# (edward/edward2 use the Klatt synthesizer's modes 5 and 6, which no training voice uses)
EVAL_VARIANTS = ["m6", "m7", "m8", "f4", "f5", "klatt2", "klatt4", "Michael", "aunty", "edward",
                 "edward2", "iven", "iven2", "iven3", "iven4", "norbert", "shelby", "victor", "quincy",
                 "belinda"]

TRAIN_POS_TEXTS = ["hey marvin", "hey marvin", "hey, marvin", "hey marvin!"]
EVAL_POS_TEXTS = ["hey marvin", "hey marvin", "hey, marvin"]

TRAIN_CONFUSABLES = [
    "hey martin", "marvel", "hey mark", "hey there", "carving", "hey marvellous", "hey margin",
    "hey melvin", "hey kevin", "hey darwin", "hey mary", "hey man", "starving", "hey marco",
    "okay marvel", "hey garden", "hey marty", "hey martha", "hey, martin", "hey marble",
    "hey mavis", "hey alvin", "hey calvin", "hey gavin", "hey harvey", "hey marlon",
    "hey marvels", "marvellously", "hey mardi", "hey martini", "hey harvard", "hey marching",
    "hey marla", "hey irvin", "hey marge", "hey march", "hey carving", "hey, marvellous",
]
EVAL_CONFUSABLES = [
    "hey martin", "marvel", "hey mark", "hey there", "carving", "hey marvellous",
    "hey kelvin", "hey marvel", "hey margo", "carving knife", "hey mabel",
]
TRAIN_SENTENCES = [
    "the weather today is cloudy with a chance of rain",
    "please turn off the lights in the kitchen",
    "i think we should leave a little earlier tomorrow",
    "can you send me the report by friday",
    "the train to the city leaves at half past nine",
    "my favourite colour has always been green",
    "she bought three apples and a loaf of bread",
    "we are going to the mountains next weekend",
    "how much does this jacket cost",
    "the meeting has been moved to the afternoon",
    "let me know when you get home",
    "there is a new restaurant on the corner",
    "he plays the guitar every evening",
    "the children were playing in the garden",
    "remember to water the plants",
    "what time does the museum open",
    "i left my keys on the table",
    "the stock market went up again",
    "could you repeat that please",
    "turn the volume down a little",
    "set a timer for ten minutes",
    "play some relaxing music",
    "what is the capital of australia",
    "the dog barked at the mailman",
    "our flight was delayed by two hours",
    "i need to buy milk, eggs and butter",
    "the movie starts at eight o'clock",
    "open the window, it is getting warm",
    "they painted the fence white",
    "hello, how are you doing today",
    "good morning everyone",
    "thank you very much for your help",
    "martha made a cake for the party",
    "the marching band played loudly",
    "we saw a marmot near the river",
    "he is a very talented marathon runner",
    "the harvest was good this year",
    "a carving of a bird sat on the shelf",
    "her name is mary and she lives in paris",
    "hey, can you help me with this",
    "hey, what are you doing",
    "the van is parked outside",
    "marvellous weather we are having",
    "it was a marvel of engineering",
    "martin called about the invoice",
    "mark my words, it will rain",
    "heavy rain is expected in the evening",
    "i have seven brothers and sisters",
    "the server handles many requests",
    "this is a test of the speech system",
]
EVAL_SENTENCES = [
    "the library closes at six on weekdays",
    "we should repaint the living room this summer",
    "my sister is learning to play the violin",
    "the bus was late again this morning",
    "could you pass me the salt please",
    "i am reading a book about ancient rome",
    "the price of coffee went up last month",
    "there are too many cars on this road",
    "let us meet at the station at noon",
    "the cat is sleeping on the sofa",
    "our team won the match on saturday",
    "he forgot to charge his phone",
    "please write your name at the top of the page",
    "the river flooded after the storm",
    "i would like a cup of tea",
    "the garden is full of roses",
    "tomorrow will be sunny and warm",
    "she is working on a new project",
    "turn left at the next traffic light",
    "this soup needs a little more salt",
    "marvellous news about the new bridge",
    "the marvel film opens on friday",
    "mark and martin are carving a pumpkin",
    "hey there, how was your trip",
    "hey, can you call me back later",
]
CONFUSABLE_P = 0.35  # share of utterances in negative streams drawn from the confusables

# Labels for keyword windows (a window's time t = its last embedding's time, in samples;
# its audio spans about [t - 1.99 s, t]): positive when end <= t <= end + POS_AFTER_S,
# negative when the window cannot hold any of the phrase, otherwise left out of training.
POS_FROM_S = 0.0
POS_AFTER_S = 0.4
NEG_STRIDE = 2  # training uses every 2nd window of the long negative streams
WINDOW_AUDIO_S = 2.0

# Head training (numpy): Flatten -> Gemm 1536x64 -> Relu -> Gemm 64x1 -> Sigmoid.
HIDDEN = 64
EPOCHS = 30
BATCH = 256
LR = 1e-3
WEIGHT_DECAY = 1e-4
INPUT_NOISE = 0.0       # std of gaussian noise added to the standardised inputs
DROPOUT = 0.0           # on the hidden layer
PAIR_BOOST = 1.0        # extra weight on the confusable twins' windows
POS_WEIGHT_SHARE = 0.25  # positives carry this share of the total loss weight

# Fixtures: sentences around the phrase, said by one held-out voice. The first candidate
# whose streaming run meets the checks is used.
FIXTURE_VOICES = [("en-gb-scotland+m7", 150, 45), ("en-gb-x-gbcwmd+f4", 160, 60),
                  ("en-gb-scotland+Michael", 140, 40), ("en-gb-x-gbcwmd+edward", 170, 50)]
FIXTURE_POSITIVE = [("gap", 0.8), ("say", "i would like a cup of tea"), ("gap", 1.0),
                    ("say", PHRASE), ("gap", 1.1), ("say", "turn left at the next traffic light"),
                    ("gap", 1.3), ("say", "the garden is full of roses"), ("gap", 0.9),
                    ("say", PHRASE), ("gap", 0.7), ("say", "tomorrow will be sunny and warm"),
                    ("gap", 1.4)]
FIXTURE_NEGATIVE = [("gap", 0.7), ("say", "hey martin, did you see the new marvel film"),
                    ("gap", 0.9), ("say", "the library closes at six on weekdays"),
                    ("gap", 0.8), ("say", "she is carving a pumpkin"), ("gap", 0.8),
                    ("say", "hey there, how was your trip"), ("gap", 1.2)]
FIXTURE_NOISE_RMS = 0.001


def log(*args):
    print(*args, flush=True)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
